"""Progress in logs: when stderr is not a terminal, bars print plain lines (issue 14)."""

import io

from bd4nn.progress import LineWriter, bar


def test_a_bar_into_a_log_writes_plain_lines_only(monkeypatch):
    monkeypatch.setenv("BD4NN_PROGRESS_SECONDS", "0")  # a line per update, to see every redraw
    log = io.StringIO()  # not a terminal
    outer = bar(total=3, desc="build", unit="cand", file=log, position=1)
    for i in range(3):
        for _ in bar(range(2), desc="epochs", leave=False, file=log):  # a nested bar: cursor moves on a TTY
            pass
        outer.update(1)
        outer.set_postfix(kept=i + 1)
    outer.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(line.strip() for line in lines)  # no blank lines either
    assert lines[-1].startswith("build: 100%") and "3/3" in lines[-1] and "kept=3" in lines[-1]
    assert any(line.startswith("epochs:") for line in lines)


def test_line_writer_drops_redraw_controls():
    out = io.StringIO()
    w = LineWriter(out)
    w.write("\rbuild:  50%|##  | 1/2   ")
    w.write("\x1b[A")
    w.write("\n")
    assert out.getvalue() == "build:  50%|##  | 1/2\n"
