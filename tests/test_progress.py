import io

from qgraph.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_draws_on_a_terminal_and_ends_the_line():
    stream = Terminal()
    bar = ProgressBar("work", 4, stream=stream, width=8)
    bar.update(4, "done")
    bar.close()
    assert stream.getvalue() == "\rwork [########] 4/4 done\n"


def test_bar_is_silent_off_a_terminal_or_when_disabled():
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        bar = ProgressBar("work", 2, enabled=enabled, stream=stream)
        bar.update(2, "x")
        bar.close()
        assert stream.getvalue() == ""
