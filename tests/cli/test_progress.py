"""One bar builder: each callback shape drives it; a study's bar ends as "DESCRIPTION: done"."""

import io

from rich.console import Console

from lorasoup.cli.progress import count_progress, score_progress, stage_progress, step_progress


def console() -> Console:
    return Console(file=io.StringIO(), width=120, force_terminal=False)


def test_each_callback_shape_drives_the_bar():
    out = console()
    with step_progress(out, "training") as update:
        update(1, 4, 2.5)
        update(4, 4, 0.125)
    with count_progress(out, "merging") as update:
        update(3, 3)
    with score_progress(out, "eval qa") as update:
        update(2, 2, 0.5)
    text = out.file.getvalue()
    assert "training" in text and "4/4" in text and "loss 0.1250" in text
    assert "merging" in text and "3/3" in text
    assert "eval qa" in text and "accuracy 0.500" in text


def test_stage_progress_shows_the_running_stage_then_done():
    out = console()
    with stage_progress(out, "demo") as stage:
        stage("seed 0: training skills", 1, 3)
    assert "demo: done" in out.file.getvalue() and "3/3" in out.file.getvalue()


def test_not_a_terminal_prints_one_plain_line_per_stage_as_it_starts():
    out = console()
    with stage_progress(out, "demo") as stage:
        stage("seed 0: training skills", 0, 3)
        assert out.file.getvalue().startswith("seed 0: training skills (0/3) [0:00:0")  # written at once
        stage("seed 0: training skills", 1, 3)  # same stage: no new line
        stage("seed 0: CAT", 2, 3)
    lines = out.file.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "seed 0: training skills (0/3)",
        "seed 0: CAT (2/3)",
        "demo: done: 3/3",
    ]


def test_a_failure_before_any_progress_prints_no_bar():
    for terminal in (False, True):
        out = Console(file=io.StringIO(), width=120, force_terminal=terminal)
        try:
            with step_progress(out, "training CAT weights"):
                raise ValueError("bad adapter")
        except ValueError:
            pass
        assert out.file.getvalue() == "", terminal
