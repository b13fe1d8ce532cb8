"""Stop strings over streamed text pieces: held back while they might match, cut just before a match."""

from __future__ import annotations

from mlxd_daemon.stop_strings import StopStrings


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    s = StopStrings(stops)
    out = []
    for piece in pieces:
        out.append(s.push(piece))
        if s.stopped:
            break
    else:
        out.append(s.flush())
    return out, s.stopped


class TestStopStrings:
    def test_stop_spanning_pieces_cuts_before_it(self) -> None:
        """A stop string split over pieces is held back, then the text ends just before it."""
        assert run(["END"], ["ab", "cE", "N", "Dxyz"]) == (["ab", "c", "", ""], True)

    def test_false_start_is_released(self) -> None:
        """Text that only looked like the start of a stop string is emitted once it cannot match."""
        out, stopped = run(["END"], ["aE", "Nb", "c"])
        assert ("".join(out), stopped) == ("aENbc", False)
        assert out[0] == "a"

    def test_held_text_is_flushed_at_the_end(self) -> None:
        """A partial match at the end of generation is still part of the text."""
        assert run(["END"], ["xyEN"]) == (["xy", "EN"], False)

    def test_earliest_of_several_stops_wins(self) -> None:
        """With several stop strings the text ends before the one that starts first."""
        assert run(["world", "lo w"], ["hello world"]) == (["hel"], True)

    def test_no_stops_passes_text_through(self) -> None:
        """Without stop strings (or with only empty ones) every piece passes unchanged."""
        assert run(["", ""], ["a", "b"]) == (["a", "b", ""], False)
