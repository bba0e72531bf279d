"""The gate's decision on figures measured in this project's runs (tests/test_finetune_pro.py): a set of
random tokens moved the held-out loss 4.657 -> 4.566 (-2 %) and must be refused; a taught fact moves it
by far more; a candidate that damages the regression text is refused whatever it learnt."""

from slm_app.finetune.gate import decide


def test_a_candidate_that_learnt_nothing_is_refused():
    ok, reasons = decide({"new_data_nll": 4.6572, "regression_ppl": 24.529},
                         {"new_data_nll": 4.5656, "regression_ppl": 24.701}, 0.05, 0.1)
    assert not ok and "did not improve enough" in reasons[0]


def test_a_taught_fact_passes_and_a_damaging_one_does_not():
    before = {"new_data_nll": 2.5, "regression_ppl": 24.5}
    assert decide(before, {"new_data_nll": 0.02, "regression_ppl": 25.0}, 0.05, 0.1)[0]
    ok, reasons = decide(before, {"new_data_nll": 0.02, "regression_ppl": 27.0}, 0.05, 0.1)
    assert not ok and "worsened too much" in reasons[1]
