"""Table-1 preference-model accuracies with counts (safejax.evaluate.prefs)."""

import pytest

from safejax.evaluate import preference_accuracy_table, preference_table_markdown

RM_BETTER = [1.0, 2.0, 0.5, 3.0]
RM_WORSE = [0.0, 2.0, 1.0, -1.0]  # correct: yes, tie (wrong), no, yes -> 2/4
CM_SAFER = [-1.0, 0.5, -2.0, 0.0]
CM_UNSAFER = [1.0, 0.2, -1.0, 0.0]  # unsafer > safer: yes, no, yes, tie -> 2/4
SAFER_IS_SAFE = [True, True, True, True]
UNSAFER_IS_SAFE = [False, False, True, False]
# sign: safer costs  -1 safe ok, .5 safe wrong, -2 safe ok, 0 safe wrong (zero is wrong)     -> 2/4
#       unsafer costs 1 unsafe ok, .2 unsafe ok, -1 safe ok, 0 unsafe wrong                  -> 3/4


def test_accuracy_table_counts_on_hand_built_pairs():
    t = preference_accuracy_table(RM_BETTER, RM_WORSE, CM_SAFER, CM_UNSAFER, SAFER_IS_SAFE, UNSAFER_IS_SAFE)
    assert t["rm_ranking"] == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert t["cm_ranking"] == {"accuracy": 0.5, "correct": 2, "total": 4}
    sign = t["cm_sign"]
    assert (sign["correct"], sign["total"]) == (5, 8)
    assert sign["accuracy"] == pytest.approx(5 / 8)
    assert (sign["safe_correct"], sign["safe_total"]) == (3, 5)
    assert (sign["unsafe_correct"], sign["unsafe_total"]) == (2, 3)


def test_accuracy_table_markdown_has_table1_rows_and_counts_per_column():
    v1 = preference_accuracy_table(RM_BETTER, RM_WORSE, CM_SAFER, CM_UNSAFER, SAFER_IS_SAFE, UNSAFER_IS_SAFE)
    v2 = preference_accuracy_table(rm_better=[1.0, 1.0], rm_worse=[0.0, 0.0])  # RM only
    md = preference_table_markdown({"v1": v1, "v2": v2})
    lines = md.splitlines()
    assert lines[0] == "| model | metric | v1 | v2 |"
    assert lines[2] == "| RM | ranking accuracy | 50.00% (2/4) | 100.00% (2/2) |"
    assert lines[3] == "| CM | ranking accuracy | 50.00% (2/4) | - |"
    assert lines[4] == "| CM | sign (safety-classification) accuracy | 62.50% (5/8) | - |"
    single = preference_table_markdown(v2)
    assert single.splitlines()[0] == "| model | metric | accuracy |"
    assert "CM" not in single


def test_accuracy_table_rejects_half_given_inputs():
    with pytest.raises(ValueError, match="rm_better and rm_worse"):
        preference_accuracy_table(rm_better=[1.0])
    with pytest.raises(ValueError, match="safer_is_safe and unsafer_is_safe"):
        preference_accuracy_table(cm_safer=[0.0], cm_unsafer=[1.0], safer_is_safe=[True])
    with pytest.raises(ValueError, match="length mismatch"):
        preference_accuracy_table(rm_better=[1.0, 2.0], rm_worse=[0.0])
    with pytest.raises(ValueError, match="no RM or CM"):
        preference_accuracy_table()
