"""The interactive chat loop behind `herd chat` (and `make run`)."""

from __future__ import annotations

import sys
from typing import Callable

HELP = ("commands: /system TEXT (set the system prompt and start over), /image PATH (attach a picture to your next "
        "message; /image alone drops it), /reset, /exit (or Ctrl-D); Ctrl-C stops a reply")


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


def accepts_images(llm) -> bool:
    """Whether a model object takes image parts in its messages (ImageChat, a vision checkpoint's VisionLLM)."""
    return bool(getattr(llm, "accepts_images", False))


def run_chat(llm, system: str | None = None, sampling: dict | None = None, stdin=None, stdout=None,
             images: list | None = None, vision_loader: Callable[[], object] | None = None) -> None:
    """Chat with history. Not a terminal: read one user message from stdin, print the reply, return.

    images: pictures attached to the first message (`herd chat --image`). vision_loader: called once, the first time
    an image is attached to a model that takes none, to get one that does (e.g. the default vision model); it raises
    a HerdError saying what is missing when there is none.
    """
    from herd.errors import HerdError
    from herd.image_prompts import user_message

    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    sampling = dict(sampling or {})
    pending = list(images or [])
    if pending and not accepts_images(llm):
        if vision_loader is None:
            raise_no_images(llm)
        llm = vision_loader()
    base = [{"role": "system", "content": system}] if system else []
    if not stdin.isatty():
        text = stdin.read().strip()
        if text or pending:
            _reply(llm, base + [user_message(text, pending)], sampling, out)
        return
    messages = list(base)
    out.write(f"herd chat with {llm.source} ({HELP})\n")
    if pending:
        out.write(f"({len(pending)} image(s) attached to your first message)\n")
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
            messages, pending = list(base), []
            out.write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip()
            base = [{"role": "system", "content": system}] if system else []
            messages = list(base)
            out.write("(system prompt set; history cleared)\n" if system else "(system prompt removed)\n")
            continue
        if text == "/image" or text.startswith("/image "):
            try:
                if text != "/image" and not accepts_images(llm):
                    if vision_loader is None:
                        raise_no_images(llm)
                    llm = vision_loader()
                    out.write(f"(now chatting with {llm.source})\n")
                out.write(image_command(text, pending) + "\n")
            except HerdError as e:
                out.write(f"error: {e}\n")
            continue
        if text.startswith("/"):
            out.write(HELP + "\n")
            continue
        messages.append(user_message(line, pending))
        try:
            reply = _reply(llm, messages, sampling, out)
        except Exception as e:  # a failed turn (e.g. context full, a bad image) must not end the chat
            if not isinstance(e, HerdError):
                raise
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        pending = []
        messages.append({"role": "assistant", "content": reply})


def raise_no_images(llm):
    from herd.errors import GenerationError

    raise GenerationError(f"{llm.source} takes no images: give a vision checkpoint (Llama 3.2 Vision, Llama 4) or a "
                          f"vision model trained with `herd train-vision` (--vision DIR)")


def image_command(line: str, pending: list) -> str | None:
    """Handle `/image PATH` (attach) and `/image` alone (drop attached images); returns what to tell the user, or
    None when the line is not an /image command. The image is checked now, so a bad file fails at once."""
    from herd.images import load_image

    text = line.strip()
    if text != "/image" and not text.startswith("/image "):
        return None
    path = text[len("/image"):].strip().strip("'\"")
    if not path:
        pending.clear()
        return "(attached images removed)"
    img = load_image(path)
    pending.append(path)
    return f"(image attached: {path}, {img.size[0]}x{img.size[1]}; it goes with your next message)"
