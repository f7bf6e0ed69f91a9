"""examples/progress.py: tqdm's live bar on a terminal, one plain line every log_every steps in a log,
the postfix values shown in both, and clear errors for bad arguments."""

import io
import os
import time

import pytest

from examples.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_output_prints_one_line_per_log_every_steps_and_the_last_step():
    out = io.StringIO()
    bar = progress(10, desc="train", log_every=3, stream=out)
    for i in range(10):
        bar.update(loss=0.5 / (i + 1))
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("train: 100% 10/10 [") and lines[-1].endswith("loss=0.05]")


def test_log_lines_count_rates_from_the_resumed_step_and_show_time_left():
    out = io.StringIO()
    bar = progress(100, initial=90, log_every=5, stream=out, unit="step")
    bar.update(5, loss=0.1, **{"img/s": 451.7})
    line = out.getvalue().splitlines()[0]
    assert " 95/100 [" in line and "<" in line          # elapsed<remaining
    assert "step/s" in line and "img/s=452" in line
    bar.close()
    assert len(out.getvalue().splitlines()) == 1        # step 95 already printed, nothing new at close


def test_close_prints_the_last_step_reached_when_stopped_early():
    out = io.StringIO()
    with progress(100, log_every=50, stream=out) as bar:
        bar.update(7)
    assert out.getvalue().splitlines()[-1].split()[1] == "7/100"


def test_terminal_gets_tqdms_live_bar_with_the_postfix():
    out = Terminal()
    bar = progress(4, desc="sample", unit="batch", stream=out)
    for _ in range(4):
        bar.update(loss=0.25)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "sample: 100%" in text and "4/4" in text and "loss=0.25" in text and "batch/s" in text


def test_write_puts_a_message_on_its_own_line_in_both_modes():
    for out in (io.StringIO(), Terminal()):
        bar = progress(3, stream=out, log_every=1)
        bar.update()
        bar.write("stopping: interrupted")
        bar.close()
        assert "\nstopping: interrupted\n" in "\n" + out.getvalue().replace("\r", "\n")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total=-1), "total must be non-negative"),
        (dict(total=3, initial=4), r"initial must be in \[0, total=3\]"),
        (dict(total=3, log_every=0), "log_every must be at least 1"),
        (dict(total=3.5), "total must be an integer"),
    ],
)
def test_bad_arguments_are_refused_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        progress(**kwargs, stream=io.StringIO())


def test_updates_after_close_or_backwards_are_refused():
    bar = progress(3, stream=io.StringIO())
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        bar.update(-1)
    bar.close()
    with pytest.raises(ValueError, match="closed"):
        bar.update()


def test_a_real_terminal_that_reports_no_size_still_shows_the_bar():
    master, slave = os.openpty()            # a fresh pty reports 0 columns and 0 rows, as under `script`
    try:
        with os.fdopen(slave, "w", closefd=False) as out:
            assert out.isatty() and os.get_terminal_size(slave).columns == 0
            bar = progress(3, desc="train", stream=out)
            for _ in range(3):
                bar.update(loss=0.5)
            bar.close()
            out.flush()
        os.set_blocking(master, False)
        chunks, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < 0.5:   # read until the pty has been quiet for half a second
            try:
                chunks.append(os.read(master, 65536))
                quiet_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        text = b"".join(chunks).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "train: 100%" in text and "3/3" in text and "loss=0.5" in text
