"""Scaffolds: how a model's turn is read as a tool call, and how tools are described to it.

Two tool-call formats, selectable per task, so the same task trains under both:

- `xml`: shell commands in `<bash>...</bash>`, the final answer in `<answer>...</answer>`.
- `json`: one JSON object per turn, `{"tool": "shell", "args": {"cmd": ...}}`,
  `{"tool": "write", "args": {"path": ..., "content": ...}}` (a file editor that writes whole
  files) or `{"tool": "submit", "args": {"answer": ...}}`, optionally inside a ```json fence.

Parsing never raises: output that is neither a tool call nor an answer is an `invalid` action
with the reason, which ends the episode with reward 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass
class Action:
    kind: str                        # "shell" | "write" | "answer" | "invalid"
    args: dict = field(default_factory=dict)
    reason: str = ""                 # why an action is invalid


class Scaffold:
    name = ""

    def system_prompt(self) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> Action:
        raise NotImplementedError

    def render(self, action: Action) -> str:
        """The model turn that expresses `action` (for oracle demonstrations and replay)."""
        raise NotImplementedError


class XMLScaffold(Scaffold):
    name = "xml"
    _TAG = re.compile(r"<(bash|answer)>(.*?)</\1>", re.S)

    def system_prompt(self) -> str:
        return ("Run a shell command with <bash>command</bash>; you will see its output. "
                "Give the final answer with <answer>answer</answer>.")

    def parse(self, text: str) -> Action:
        match = self._TAG.search(text)
        if match is None:
            if not text.strip():
                return Action("invalid", reason="empty turn")
            return Action("invalid", reason="no <bash> or <answer> tag")
        tag, body = match.groups()
        if tag == "bash":
            return Action("shell", {"cmd": body.strip()}) if body.strip() else \
                Action("invalid", reason="empty <bash> command")
        return Action("answer", {"answer": body.strip()})

    def render(self, action: Action) -> str:
        if action.kind == "shell":
            return f"<bash>{action.args['cmd']}</bash>"
        if action.kind == "write":   # the XML scaffold has no editor: write through the shell
            body = action.args["content"].replace("'", "'\"'\"'")
            return f"<bash>printf '%s' '{body}' > {action.args['path']}</bash>"
        return f"<answer>{action.args['answer']}</answer>"


class JSONScaffold(Scaffold):
    name = "json"
    _FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.S)
    _TOOLS = {"shell": ("cmd",), "write": ("path", "content"), "submit": ("answer",)}

    def system_prompt(self) -> str:
        return ('Call one tool per turn as JSON: {"tool": "shell", "args": {"cmd": "..."}}, '
                '{"tool": "write", "args": {"path": "...", "content": "..."}} or '
                '{"tool": "submit", "args": {"answer": "..."}}.')

    def parse(self, text: str) -> Action:
        fenced = self._FENCE.search(text)
        raw = fenced.group(1) if fenced else text[text.find("{"):text.rfind("}") + 1]
        if not raw:
            return Action("invalid", reason="empty turn" if not text.strip() else "no JSON tool call")
        try:
            call = json.loads(raw)
        except json.JSONDecodeError as err:
            return Action("invalid", reason=f"unparsable tool call: {err.msg}")
        if not isinstance(call, dict) or call.get("tool") not in self._TOOLS:
            return Action("invalid", reason=f"unknown tool {call.get('tool') if isinstance(call, dict) else call!r}")
        args = call.get("args")
        needed = self._TOOLS[call["tool"]]
        if not isinstance(args, dict) or any(not isinstance(args.get(k), str) for k in needed):
            return Action("invalid", reason=f"tool {call['tool']} needs string args {', '.join(needed)}")
        kind = "answer" if call["tool"] == "submit" else call["tool"]
        return Action(kind, {k: args[k] for k in needed})

    def render(self, action: Action) -> str:
        tool = "submit" if action.kind == "answer" else action.kind
        return json.dumps({"tool": tool, "args": action.args})


SCAFFOLDS = {s.name: s for s in (XMLScaffold(), JSONScaffold())}


def get_scaffold(name: str) -> Scaffold:
    if name not in SCAFFOLDS:
        raise ValueError(f"scaffold {name!r} is not one of {', '.join(SCAFFOLDS)}")
    return SCAFFOLDS[name]
