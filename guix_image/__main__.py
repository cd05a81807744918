"""The console entry point (`guix-image`, and `python -m guix_image`).

It imports nothing before its `try`: a Ctrl-C while Python imports the
command line then ends as one once the command runs does, quietly with
status 130. The standard streams are guarded first (see cli/streams.py).
"""


def run() -> None:
    try:
        from .cli import streams

        streams.guard()
        from .cli.app import run as run_command_line

        run_command_line()
    except KeyboardInterrupt:  # before the command's own handling began
        import contextlib
        import os

        with contextlib.suppress(OSError):
            os.write(2, b"guix-image: interrupted\n")
        os._exit(130)


if __name__ == "__main__":
    run()
