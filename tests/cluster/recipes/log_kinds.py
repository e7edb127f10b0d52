"""What the lines of a run's console log are, by kind (a log should read as sentences)."""

import collections
import re

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
KINDS = [  # (kind, pattern), the first that matches names the line
    ("stack_dump", re.compile(r"SIGSEGV|Fatal Python error|Segmentation fault|Stack \(most recent|^\s+File \"|"
                              r"Traceback \(most recent|\*\*\* Aborted|Thread 0x")),
    ("deprecation", re.compile(r"DeprecationWarning|deprecated")),
    ("ray_data_progress", re.compile(r"logging_progress\.py|Progress bars (for operators )?disabled|"
                                     r"execution finished in|Starting execution of Dataset|Execution plan of|"
                                     r"Progress will be logged")),
    ("progress_bar", re.compile(r"\d+%\|.*\||it/s\]|s/it\]")),
    ("ray_error", re.compile(r"\[[\d\- :,]+ E \d+ \d+\]")),
    ("blank", re.compile(r"^\s*$")),
    ("moray", re.compile(r"(INFO|WARNING|ERROR) (cluster|trainers|reward_models|serving)\.")),
]


def kind_of(line: str) -> str:
    line = ANSI.sub("", line).replace("\r", "")
    return next((k for k, pattern in KINDS if pattern.search(line)), "other")


def line_kinds(text: str) -> collections.Counter:
    """How many lines of ``text`` are of each kind."""
    return collections.Counter(kind_of(line) for line in text.rstrip("\n").split("\n"))
