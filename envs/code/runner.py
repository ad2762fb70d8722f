"""What runs inside the sandbox to test one candidate. Standard library only: its source is passed to
`python3 -I -c` (envs.code.verify.RUNNER), and running it as a script calls `main()`.

argv: mode ("function" | "stdio") and the program file; function mode adds the entry point, and stdin
holds a JSON object: the pass `token`, the task's `prompt` and its `test`.

Stdio mode runs the program once; the grader compares its stdout with the expected output.

Function mode keeps the candidate and its check in two processes. Whatever shares an interpreter with
the candidate, the candidate can change (builtins, the test's globals and frames, trace hooks, a
result's `__eq__`) or read (the pass token). So this process, the checker, forks the candidate's
process before it reads stdin, and never runs candidate code. The candidate's process execs the program
(prompt + completion) and answers calls. The checker execs the prompt on its own (its helpers and
namedtuples, the entry point's body left out), then the test, and calls `check()` with a proxy that
sends each call's arguments over a pipe and returns the reply.

Everything crosses as plain data, as tagged JSON the checker decodes into int, float, complex, bool,
str, bytes, None, list, tuple, dict, set, frozenset (at most 100 deep) or a namedtuple class of the
prompt's. So no value the test compares can run candidate code. A subclass of those types crosses as
its base (an IntEnum as an int, a Counter as a dict); anything else (a generator, a Fraction, an object
of the candidate's own class) fails the run as "not plain data". A callable argument of the test's
stays in the checker: the candidate gets a stub that calls it there. A list, dict or set argument the
candidate changes in place is changed the same way in the checker after the call.

The checker is non-dumpable from before the fork, so the candidate (same uid) cannot read its memory or
fds through /proc or ptrace. The test never touches the disk, so the candidate cannot read the
expected values either. A pass is the token, printed last on stdout after the candidate's process is
killed; the candidate's stdout is redirected to stderr.

Exit status: 0 with the token when check() returned; SYNTAX_EXIT for a program that does not compile;
ASSERT_EXIT when an assert failed; EARLY_EXIT when the program exited before its tests finished; the
candidate process's fatal signal when one killed it (so memory and CPU limits read as before); 1 for any
other error.
"""

import builtins
import itertools
import json
import os
import signal
import sys
import traceback

SYNTAX_EXIT, ASSERT_EXIT, EARLY_EXIT = 97, 98, 99
MAX_DEPTH = 100
MAX_MESSAGE = 256 << 20


class NotPlain(TypeError):
    """A value that cannot cross between the checker and the candidate's process."""


_NATIVE = frozenset({str, int, float, bool, type(None)})   # what JSON gives back exactly, as itself


def encode(value, callables=None, depth=0):
    """The JSON-ready form of plain data: str, int, float, bool, None and lists as themselves, the
    rest tagged ({"t": items} a tuple, {"d": pairs} a dict, ...). Callables are passed by index into
    `callables` where that is given (the test's arguments); elsewhere they are not plain."""
    kind = type(value)
    if kind in _NATIVE:
        return value
    if depth >= MAX_DEPTH:
        raise NotPlain("data nested more than %d deep (or holding itself)" % MAX_DEPTH)
    if kind is list and set(map(type, value)) <= _NATIVE:   # the common case, at C speed
        return value
    if kind is dict and set(map(type, value)) <= _NATIVE and set(map(type, value.values())) <= _NATIVE:
        return {"d": list(value.items())}
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, complex):
        return {"c": [complex(value).real, complex(value).imag]}
    if isinstance(value, bytes):
        return {"y": bytes(value).hex()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [encode(item, callables, depth + 1) for item in value]
        fields = getattr(type(value), "_fields", None)
        if isinstance(value, tuple) and isinstance(fields, tuple) and all(isinstance(f, str) for f in fields):
            return {"nt": [type(value).__name__, list(fields), items]}
        if isinstance(value, list):
            return items
        return {"t" if isinstance(value, tuple) else "z" if isinstance(value, frozenset) else "S": items}
    if isinstance(value, dict):
        return {"d": [[encode(k, callables, depth + 1), encode(v, callables, depth + 1)] for k, v in value.items()]}
    if callables is not None and callable(value) and not isinstance(value, type):
        callables.append(value)
        return {"fn": len(callables) - 1}
    raise NotPlain(type(value).__qualname__)


_CONTAINERS = {"t": tuple, "S": set, "z": frozenset}


def decode(item, namedtuples=None, stub=None, depth=0):
    """The value of `encode`'s output, as json.loads gives it. Builds only plain types (and the
    prompt's namedtuple classes, looked up in `namedtuples`); `stub(index)` stands in for a callable
    (the candidate's side only)."""
    kind = type(item)
    if kind in _NATIVE:
        return item
    if depth >= MAX_DEPTH:
        raise ValueError("data nested more than %d deep" % MAX_DEPTH)
    if kind is list:
        if set(map(type, item)) <= _NATIVE:
            return item
        return [decode(x, namedtuples, stub, depth + 1) for x in item]
    if kind is not dict or len(item) != 1:
        raise ValueError("not an encoded value: %.80r" % (item,))
    (tag, rest), = item.items()
    if tag in _CONTAINERS and type(rest) is list:
        return _CONTAINERS[tag](decode(x, namedtuples, stub, depth + 1) for x in rest)
    if tag == "d" and type(rest) is list:
        if set(map(type, itertools.chain.from_iterable(rest))) <= _NATIVE:
            return dict(rest)
        return {decode(k, namedtuples, stub, depth + 1): decode(v, namedtuples, stub, depth + 1) for k, v in rest}
    if tag == "y" and type(rest) is str:
        return bytes.fromhex(rest)
    if tag == "c" and type(rest) is list and len(rest) == 2 and {type(x) for x in rest} <= {int, float}:
        return complex(*rest)
    if tag == "nt" and type(rest) is list and len(rest) == 3 and type(rest[2]) is list:
        items = tuple(decode(x, namedtuples, stub, depth + 1) for x in rest[2])
        kind = (namedtuples or {}).get(rest[0]) if type(rest[0]) is str else None
        if isinstance(kind, type) and issubclass(kind, tuple) and getattr(kind, "_fields", None) == tuple(rest[1]):
            return kind(*items)
        return items
    if tag == "fn" and stub is not None and type(rest) is int:
        return stub(rest)
    raise ValueError("not an encoded value: %.80r" % (item,))


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    """The next message, or None at end of file (the other process is gone)."""
    header = _read_exact(fd, 8)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE:
        raise ValueError("a message of %d bytes" % size)
    body = _read_exact(fd, size)
    if body is None:
        return None
    return json.loads(body)


def _read_exact(fd, size):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def rebuilt(name, text):
    """An exception raised on the other side, as the builtin class of that name where there is one."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(text)
        except Exception:   # a class that takes other arguments (UnicodeDecodeError)
            pass
    return RuntimeError("%s: %s" % (name, text))


def _described(error):
    try:
        return [type(error).__name__, str(error)]
    except Exception:   # the candidate's exception may break str()
        return [type(error).__name__, ""]


# ----------------------------------------------------------------------------- the candidate's side


def serve(path, entry_point, calls, replies):
    """Exec the program, then answer calls until the checker goes. Runs candidate code: nothing here is
    trusted by the checker, which decodes whatever arrives."""
    def stub(index):
        def call_the_checker(*args, **kwargs):
            send(replies, ["callback", index, [encode(a) for a in args], {k: encode(v) for k, v in kwargs.items()}])
            reply = receive(calls)
            if reply is None:
                os._exit(0)
            if reply[0] == "raise":
                raise rebuilt(*reply[1:])
            return decode(reply[1])
        return call_the_checker

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            code = compile(f.read(), path, "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        send(replies, ["syntax"])
        return
    sys.argv = [path]
    sys.path.insert(0, os.getcwd())
    scope = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
    reply = _guarded(lambda: exec(code, scope) or ["ready"])
    while reply is not None:
        send(replies, reply)
        if reply[0] not in ("ready", "return", "raise"):
            return
        message = receive(calls)
        if message is None:
            return
        args = [decode(a, stub=stub) for a in message[1]]
        kwargs = {k: decode(v, stub=stub) for k, v in message[2].items()}
        reply = _guarded(lambda: ["return", encode(scope[entry_point](*args, **kwargs)),
                                  _mutable(enumerate(args)), _mutable(kwargs.items())])


def _guarded(run):
    try:
        return run()
    except NotPlain as e:
        return ["impure", str(e)]
    except SystemExit as e:
        return ["exit", repr(e.code)]
    except BaseException as e:
        traceback.print_exc()
        return ["raise", *_described(e)]


def _mutable(named):
    """[name, value] of the list, dict and set arguments, as they are after the call."""
    return [[k, encode(v)] for k, v in named if isinstance(v, (list, dict, set))]


# ------------------------------------------------------------------------------------ the checker


def _prompt_code(prompt):
    """The prompt compiled on its own: as it is if it compiles, else with the entry point's body
    stubbed (a prompt usually ends with a bare `def` line)."""
    for suffix in ("", "\n    pass\n", "\n        pass\n"):
        try:
            return compile(prompt.rstrip() + suffix if suffix else prompt, "prompt.py", "exec")
        except SyntaxError:
            continue
    return compile("", "prompt.py", "exec")


def _write_back(originals, changed, namespace):
    """The candidate changed these arguments in place: change the test's objects alike."""
    for key, value in changed:
        original = originals[key] if isinstance(originals, dict) else originals[int(key)]
        value = decode(value, namespace)
        if type(original) is not type(value):
            continue
        if isinstance(original, list):
            original[:] = value
        else:
            original.clear()
            original.update(value)


class CandidateGone(Exception):
    """The candidate's process ended: how, and the exit status to end with."""

    def __init__(self, text, status):
        super().__init__(text)
        self.status = status


def check_function(path, entry_point):
    import ctypes
    prctl = ctypes.CDLL(None).prctl
    prctl(4, 0, 0, 0, 0)   # PR_SET_DUMPABLE 0, before the candidate's process exists
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(calls_w)
            os.close(replies_r)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)     # stdin (the token and the test) is the checker's alone
            os.dup2(2, 1)        # and so is stdout
            os.close(null)
            prctl(4, 1, 0, 0, 0)   # the candidate's process dumpable again, as programs expect
            serve(path, entry_point, calls_r, replies_w)
        finally:
            os._exit(0)
    os.close(calls_r)
    os.close(replies_w)
    given = json.loads(sys.stdin.buffer.read())

    def reply():
        message = receive(replies_r)
        if message is None:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                raise CandidateGone("the candidate's process was killed by signal %d" % os.WTERMSIG(status),
                                    -os.WTERMSIG(status))
            raise CandidateGone("the program exited (status %d) before its tests finished"
                                % os.waitstatus_to_exitcode(status), EARLY_EXIT)
        kind = message[0]
        if kind == "syntax":
            raise CandidateGone("the program does not compile", SYNTAX_EXIT)
        if kind == "exit":
            raise CandidateGone("the program exited (SystemExit %s) before its tests finished" % message[1],
                                EARLY_EXIT)
        if kind == "impure":
            raise CandidateGone("the candidate returned %s, not plain data" % message[1], 1)
        if kind == "raise":
            raise rebuilt(*message[1:])
        return message

    def candidate(*args, **kwargs):
        callables = []
        try:
            message = ["call", [encode(a, callables) for a in args],
                       {k: encode(v, callables) for k, v in kwargs.items()}]
        except NotPlain as e:
            raise CandidateGone("the test passes the candidate a %s, which cannot cross to its process" % e, 1)
        send(calls_w, message)
        while True:
            message = reply()
            if message[0] == "return":
                _write_back(args, message[2], namespace)
                _write_back(kwargs, message[3], namespace)
                return decode(message[1], namespace)
            if message[0] != "callback":
                raise ValueError("unexpected message %.80r" % (message,))
            try:
                result = callables[message[1]](*[decode(a, namespace) for a in message[2]],
                                               **{k: decode(v, namespace) for k, v in message[3].items()})
                answer = ["result", encode(result)]
            except Exception as e:
                answer = ["raise", *_described(e)]
            send(calls_w, answer)

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        reply()   # the program ran
        exec(_prompt_code(given["prompt"]), namespace)
        namespace[entry_point] = candidate
        exec(compile(given["test"], "test.py", "exec"), namespace)
        namespace["check"](candidate)
    except CandidateGone as e:
        sys.stderr.write("%s\n" % e)
        _end(pid, e.status)
    except AssertionError:
        traceback.print_exc()
        _end(pid, ASSERT_EXIT)
    except BaseException:
        traceback.print_exc()
        _end(pid, 1)
    _end(pid, 0, given["token"])


def _end(pid, status, token=None):
    """Kill the candidate's process, then exit with `status` (a negative one: die of that signal)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    if token is not None:
        os.write(1, ("\n%s\n" % token).encode())
    if status < 0:
        if -status != signal.SIGKILL:
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def main():
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)   # ints cross as JSON decimals, of any length
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "function":
        check_function(path, sys.argv[3])
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            code = compile(f.read(), path, "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        sys.exit(SYNTAX_EXIT)
    sys.argv = [path]
    sys.path.insert(0, os.getcwd())
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": builtins})


if __name__ == "__main__":
    main()
