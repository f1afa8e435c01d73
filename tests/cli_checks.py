"""Running a console script's ``main()`` in-process and checking its one-line errors."""

from __future__ import annotations


def run_main(main, argv, capsys):
    """``main(argv)`` in-process: (exit code, stdout, stderr), argparse exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(prog: str, code, err: str, *words: str) -> None:
    """Exit code 2 and a single ``PROG: error: ...`` line holding every one of ``words``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
