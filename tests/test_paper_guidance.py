"""The paper's published PLW guidance (pipeline/analysis/paper_guidance.py) at the R_g values the
issue names (0.08, 1.0, 1.5, 7.8) and between them, and ``suggest`` answering from it without a study
of one's own (no fitted GAM)."""

from __future__ import annotations

import math

import pytest

from pipeline.analysis.paper_guidance import paper_answer


@pytest.mark.parametrize(
    "r_g, regime, plw, low, high, says",
    [
        (0.08, "short", 0.155, 0.155, 0.242, ["PLW about 0.155", "critical PLW 0.242", "avoid PLW 0 and PLW 1"]),
        (1.0, "short", 0.155, 0.155, 0.242, ["about 0.155 for R_g <= 1"]),
        (1.25, "intermediate", 0.2165, 0.155, 0.278, ["linear", "not a published value"]),
        (1.5, "intermediate", 0.278, 0.155, 0.278, ["PLW about 0.278"]),
        (2.5, "gap", None, 0.0, 0.278, ["no published optimum"]),
        (3.27, "long", None, 0.0, 1.0, ["no significant effect", "R_g 3.27, p = 0.237"]),
        (7.8, "long", None, 0.0, 1.0, ["no significant effect", "R_g 7.83, p = 0.0861"]),
    ],
)
def test_the_papers_answer_by_rg(r_g, regime, plw, low, high, says):
    a = paper_answer(r_g)
    assert a.regime == regime and (a.low, a.high) == (low, high)
    assert (a.plw is None) if plw is None else math.isclose(a.plw, plw, abs_tol=1e-9)
    text = a.text()
    assert (
        text.startswith("The paper's published answer (Huerta-Enochian & Ko (2024)")
        and "not fitted to your data" in text
    )
    for s in says:
        assert s in text, (s, text)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_an_undefined_rg_is_an_error(bad):
    with pytest.raises(ValueError, match="R_g must be a positive number"):
        paper_answer(bad)


@pytest.mark.shared
def test_suggest_answers_on_the_shared_data_without_any_study(tmp_path, instructions_dir, llama_tokenizer_dir, capsys):
    from pipeline.analysis.__main__ import main

    rc = main(
        [
            "suggest",
            "--data",
            str(instructions_dir / "alpaca52k_torchtune_tiny.jsonl"),
            f"paths.reports_dir={tmp_path / 'no_study'}",
            f"paths.llama_tokenizer={llama_tokenizer_dir}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "R_g = 4.254" in out  # the 100 AlpacaData rows (Table 1 of the shared data)
    assert "No fitted GAM of your own" in out and "make regress" in out
    assert "Recommended PLW" not in out
    assert "no significant effect of PLW for long-completion data" in out
