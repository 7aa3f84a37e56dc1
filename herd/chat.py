"""The interactive chat loop behind `herd chat` (and `make run`)."""

from __future__ import annotations

import sys

HELP = "commands: /system TEXT (set the system prompt and start over), /reset, /exit (or Ctrl-D); Ctrl-C stops a reply"


def _reply(llm, messages, sampling, out) -> str:
    """Stream one assistant reply to `out`; Ctrl-C stops it early and keeps what was said."""
    pieces = []
    try:
        for piece in llm.stream(messages, **sampling):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(pieces)


def run_chat(llm, system: str | None = None, sampling: dict | None = None, stdin=None, stdout=None) -> None:
    """Chat with history. Not a terminal: read one user message from stdin, print the reply, return."""
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    sampling = dict(sampling or {})
    base = [{"role": "system", "content": system}] if system else []
    if not stdin.isatty():
        text = stdin.read().strip()
        if text:
            _reply(llm, base + [{"role": "user", "content": text}], sampling, out)
        return
    messages = list(base)
    out.write(f"herd chat with {llm.source} ({HELP})\n")
    while True:
        try:
            line = input("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(base)
            out.write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip()
            base = [{"role": "system", "content": system}] if system else []
            messages = list(base)
            out.write("(system prompt set; history cleared)\n" if system else "(system prompt removed)\n")
            continue
        if text.startswith("/"):
            out.write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _reply(llm, messages, sampling, out)
        except Exception as e:  # a failed turn (e.g. context full) must not end the chat
            from herd.errors import HerdError

            if not isinstance(e, HerdError):
                raise
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
