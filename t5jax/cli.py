"""What every command line shares: flags parsed with failures as one line, expected errors as one line
(`t5jax.train: error: <what, which file or key, what to do>`) with a non-zero exit, `--help` exiting 0, and
library INFO logs (Orbax logs every file it touches) kept out unless `--verbosity` asks.

`--debug` (or T5JAX_DEBUG=1) shows the traceback instead of the one line.
"""

import functools
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

# Failures a user can cause and fix; anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, OSError, FloatingPointError, ConnectionError, UnicodeError)
HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def run(main, prog):
  """`app.run(main)` for the CLI `prog` (e.g. "t5jax.train"), with the behaviour this module describes."""
  flags.DEFINE_boolean("debug", False, "Show an error's traceback instead of one line.")
  app.run(functools.partial(_guarded, main, prog), flags_parser=functools.partial(parse_flags, prog))


def check_args(argv, *required, flag_values=flags.FLAGS):
  """A usage error for words left after the flags, or for a `required` flag not given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in required:
    if flag_values[name].value is None:
      raise app.UsageError(f"--{name} is required")


def debugging(argv=()):
  return (
    os.environ.get("T5JAX_DEBUG") == "1"
    or "--debug" in argv
    or (flags.FLAGS.is_parsed() and "debug" in flags.FLAGS and flags.FLAGS.debug)
  )


def fail(prog, message, code=1):
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(prog, argv, flag_values=flags.FLAGS):
  """absl's parsing, but `--help` exits 0 and a bad flag or config file is one line (exit 2)."""
  if any(a in HELP for a in argv[1:]):
    print(flag_values.main_module_help() or flag_values.get_help(), flush=True)
    sys.exit(0)
  config_path = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")), None)
  if config_path is not None and not os.path.isfile(config_path):
    fail(prog, f"--config={config_path}: no such config file", code=2)
  if config_path is not None:
    # A config in a package imports its siblings (`from configs import base`): the package's parent must be
    # importable whatever the working directory (appended, so it never shadows an installed module).
    package = os.path.dirname(os.path.abspath(config_path))
    if os.path.isfile(os.path.join(package, "__init__.py")) and os.path.dirname(package) not in sys.path:
      sys.path.append(os.path.dirname(package))
  try:
    return flag_values(argv)
  except Exception as e:  # noqa: BLE001  (config files run arbitrary Python; every failure gets one line)
    if debugging(argv):
      raise
    fail(prog, flag_error(e, argv), code=2)


def quiet_library_logs():
  """Warnings and errors only, none of Orbax's logs, and no tracebacks from background work that failed.

  Restoring a damaged checkpoint fails in the caller (reported in one line), but Orbax's reads still pending
  end later, on an event loop already closed: Python reports each as "Exception ignored" (an unraisable
  error) or asyncio as "Task exception was never retrieved", hundreds of tracebacks that say nothing new.
  """
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(_not_orbax_chatter)
  for name in ("asyncio", "gcsfs", "fsspec"):  # gcsfs and fsspec log what they retry or fall back from
    std_logging.getLogger(name).setLevel(std_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None


def _guarded(main, prog, argv):
  if not flags.FLAGS["verbosity"].present:
    quiet_library_logs()
  try:
    main(argv)
  except EXPECTED as e:
    if debugging():
      raise
    fail(prog, one_line(e))
  except KeyboardInterrupt:
    if debugging():
      raise
    fail(prog, "interrupted", code=130)


def _not_orbax_chatter(record):
  """Orbax warns about routine things (a checkpoint without its optional metadata file), and its background
  threads log each failure with a traceback before the same error reaches the caller, which reports it in
  one line; `--verbosity=0` shows them all."""
  return "orbax" not in record.pathname


def one_line(e):
  """An exception's message on one line (the first; our errors put what matters there)."""
  text = str(e).strip() or type(e).__name__
  if isinstance(e, UnicodeDecodeError):
    return f"not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})"
  return text.splitlines()[0]


def flag_error(e, argv):
  """One line for a failure while parsing flags: the innermost cause, named by the flag that caused it."""
  root = e
  while root.__cause__ or root.__context__:
    root = root.__cause__ or root.__context__
  config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
  if isinstance(root, SyntaxError):
    return f"{root.filename}:{root.lineno}: {root.msg} (in the config file of {config_arg})"
  if isinstance(root, (KeyError, AttributeError)):
    return _unknown_key(e, root, argv)
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  message = next((line for line in lines if re.search(r"Error: |error: ", line)), lines[0] if lines else repr(e))
  return message.removeprefix("ValueError: ")


def _unknown_key(e, root, argv):
  key = str(root).strip("'\"")
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), f"--config.*{key}")
  chain, hint = e, None
  while chain is not None and hint is None:  # ml_collections suggests the closest key on the way out
    hint = re.search(r'Did you mean \\?"([^"\\]+)', str(chain))
    chain = chain.__cause__ or chain.__context__
  return f"{flag}: no such config key {key!r}" + (f'; did you mean "{hint.group(1)}"?' if hint else "")
