"""What a message must tell its reader, checked fact by fact: the file, the flag, the value, the fix's key token
(the flag to pass, the command to run). The sentence around them may be reworded; these facts may not go."""
import re


def assert_tells(message, *facts):
    """Every fact (str() of it) appears in `message`. -> message"""
    missing = [f for f in map(str, facts) if f not in message]
    assert not missing, f"{message!r} does not tell {missing}"
    return message


def one_error(err, *facts):
    """stderr of a run that stopped on a fault: exactly one `error:` line, no traceback, and the line tells each
    fact. -> the line"""
    lines = re.findall(r"error: [^\n]*", err)  # (a progress bar may leave its line unfinished before it)
    assert len(lines) == 1 and "Traceback" not in err, err
    return assert_tells(lines[0], *facts)
