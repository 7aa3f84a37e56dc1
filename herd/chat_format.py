"""Chat formats: OpenAI-shaped messages (+ tools, images) -> token ids, kept apart from the tokenizer.

* `Llama2ChatFormat`  Meta `llama/generation.py` chat_completion: [INST] ... [/INST], <<SYS>> folded into turn 1.
* `Llama3ChatFormat`  Meta `llama_models.llama3.chat_format`: header tokens, ipython role, <|python_tag|>, eom/eot;
                      version "3.0" is the original llama3 repo behaviour (content stripped, always eot).
* `Llama4ChatFormat`  Meta `llama_models.llama4.chat_format`: <|header_start|> ... <|eot|>, eom for tool traffic,
                      image tokens for a given tile grid.
* `JinjaChatFormat`   any HF / GGUF `chat_template`, rendered as transformers' apply_chat_template renders it.

A prompt is first built as a list of pieces -- `str` (text, encoded as ordinary text) or `Tok` (one token id) -- so
that `encode_dialog` (ids) and `render` (text) can never disagree. See SPEC.md §2, §3, §5.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from datetime import datetime
from typing import Any, NamedTuple

from herd.errors import ConfigError, FormatError, GenerationError
from herd.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")


class Tok(NamedTuple):
    """One token given by id, with the text `render` shows for it."""

    id: int
    text: str


Piece = str | Tok


# ================================================================================================ messages


def _text_of(content: Any, where: str) -> str:
    """Plain text of a message content (str or list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise GenerationError(f"{where}: this chat format only takes text content parts, got {part!r:.80}")
        return "".join(out)
    raise GenerationError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")


def normalize_messages(messages: list[dict], roles: tuple[str, ...] = ROLES) -> list[dict]:
    """Check an OpenAI-shaped message list; return copies with `tool_calls` as [{name, arguments(dict|str)}]."""
    if not isinstance(messages, list):
        raise GenerationError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise GenerationError(f"{where}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in roles:
            raise GenerationError(f"{where}: unknown role {role!r} (this format accepts {', '.join(roles)})")
        calls = []
        for k, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise GenerationError(f"{where}: tool_calls[{k}] needs function.name, got {call!r:.80}")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    pass  # e.g. raw python code for code_interpreter
            calls.append({"name": fn["name"], "arguments": args})
        if calls and role != "assistant":
            raise GenerationError(f"{where}: only assistant messages carry tool_calls (role is {role!r})")
        content = m.get("content")
        if content is None:
            if not calls:
                raise GenerationError(f"{where}: missing content")
            content = ""
        elif not isinstance(content, (str, list)):
            if role in ("tool", "ipython"):
                content = json.dumps(content)  # a tool result given as JSON data
            else:
                raise GenerationError(f"{where}: content must be a string or a list of parts")
        stop = m.get("stop_reason")
        if stop not in (None, "end_of_turn", "end_of_message"):
            raise GenerationError(f"{where}: stop_reason must be 'end_of_turn' or 'end_of_message', got {stop!r}")
        out.append({"role": role, "content": content, "tool_calls": calls, "stop_reason": stop})
    return out


def _tool_names(tools: list[dict] | None) -> tuple[list[str], list[dict]]:
    """Split a tools list into built-in tool names and custom function specs."""
    builtins, custom = [], []
    for k, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise GenerationError(f"tools[{k}]: expected a dict, got {type(tool).__name__}")
        name = (tool.get("function") or {}).get("name") or tool.get("name") or tool.get("type")
        (builtins if name in BUILTIN_TOOLS else custom).append(name if name in BUILTIN_TOOLS else tool)
    return builtins, custom


CUSTOM_TOOLS_INSTRUCTION = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Add the tool prompt of Meta's llama3_1/prompt_format.md: 'Environment: ipython' (+ 'Tools: ...' for
    brave_search / wolfram_alpha) in front of the system text, custom function specs as a user message before the
    first user turn. (Meta's ChatFormat itself takes no tools; this is how its docs write them.)"""
    if not tools:
        return messages
    builtins, custom = _tool_names(tools)
    head = "Environment: ipython"
    listed = [b for b in builtins if b != "code_interpreter"]
    if listed:
        head += "\nTools: " + ", ".join(listed) + "\n"
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system = _text_of(messages[0]["content"], "message 0")
        messages[0] = {**messages[0], "content": head + ("" if head.endswith("\n") else "\n") + system}
    else:
        messages.insert(0, {"role": "system", "content": head, "tool_calls": [], "stop_reason": None})
    if custom:
        specs = "\n".join(json.dumps(t, indent=4) for t in custom)
        text = CUSTOM_TOOLS_INSTRUCTION + specs + "\n\nReturn function calls in JSON format."
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
        messages.insert(first_user, {"role": "user", "content": text, "tool_calls": [], "stop_reason": None})
    return messages


def _encode_tool_call(call: dict) -> str:
    """Text of one assistant tool call (Meta ToolUtils.encode_tool_call, JSON tool prompt format)."""
    name, args = call["name"], call["arguments"]
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        query = args.get("query", "") if isinstance(args, dict) else args
        return f'{name}.call(query="{query}")'
    if name == "code_interpreter":
        return args.get("code", "") if isinstance(args, dict) else str(args)
    return json.dumps({"type": "function", "name": name, "parameters": args})


def _parse_tool_reply(content: str, python: bool) -> tuple[str, Any] | None:
    """(name, arguments) of a tool call in an assistant reply, found as Meta's decode_assistant_message does:
    custom call (<function=..>{..}, JSON object, python list), then built-in `x.call(query="..")`, then raw code
    after a python tag."""
    custom = _custom_tool_call(content)
    if custom is not None:
        name, args = custom
        if name in BUILTIN_TOOLS:  # a built-in called in the custom format: first argument is the query
            args = {"query": next(iter(args.values()), "") if isinstance(args, dict) else args}
        return name, args
    m = re.search(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)', content)
    if m:
        return m.group("name"), {"query": m.group("query")}
    if python:
        return "code_interpreter", {"code": content}
    return None


def _custom_tool_call(content: str) -> tuple[str, Any] | None:
    m = re.search(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})", content)
    if m:
        try:
            return m.group("name"), json.loads(m.group("args").replace("'", '"'))
        except json.JSONDecodeError:
            return None
    try:
        obj = json.loads(content)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if (obj.get("type") == "function" or "name" in obj) and isinstance(obj.get("name"), str):
            return obj["name"], obj.get("parameters", obj.get("arguments", {}))
        return None
    calls = _python_list_calls(content)
    return calls[0] if calls else None


def _python_list_calls(text: str) -> list[tuple[str, dict]]:
    """Calls of a reply like '[f(a=1), g(b="x")]' (Meta's python_list tool format), else []."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return []
    calls = []
    for node in tree.body[0].value.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return []
        try:
            calls.append((node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except ValueError:
            return []
    return calls


def _assistant(content: str, call: tuple[str, Any] | None) -> dict:
    """An OpenAI-shaped assistant message."""
    if call is None:
        return {"role": "assistant", "content": content}
    name, args = call
    fn = {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}
    return {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}",
                                                                "type": "function", "function": fn}]}  # fmt: skip


# ================================================================================================ base


class ChatFormat:
    """Messages -> pieces -> ids / text. Subclasses implement `_pieces` and `parse_reply`."""

    stop_ids: frozenset[int]

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def _tok(self, name: str) -> Tok:
        i = self.tokenizer.special_tokens.get(name)
        if i is None:
            raise ConfigError(f"{type(self).__name__}: tokenizer {self.tokenizer.source} has no {name} token")
        return Tok(i, name)

    def _pieces(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> list[Piece]:
        raise NotImplementedError

    def encode_dialog(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of a conversation (ending with the assistant header when add_generation_prompt)."""
        ids: list[int] = []
        for p in self._pieces(messages, add_generation_prompt, tools):
            if isinstance(p, Tok):
                ids.append(p.id)
            else:
                ids.extend(self.tokenizer.encode(p))
        return ids

    def render(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt as text (for display / debugging)."""
        return "".join(
            p.text if isinstance(p, Tok) else p for p in self._pieces(messages, add_generation_prompt, tools)
        )

    def parse_reply(self, text: str) -> dict:
        """The assistant message (with tool_calls when the reply is a tool call) for a generated reply."""
        return {"role": "assistant", "content": text.strip()}


# ================================================================================================ Llama 2


class Llama2ChatFormat(ChatFormat):
    """Meta Llama 2 chat: BOS [INST] user [/INST] answer EOS ... BOS [INST] last user [/INST] (SPEC.md §2)."""

    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.bos = Tok(tokenizer._require(tokenizer.bos_id, "BOS"), "<s>")
        self.eos = Tok(tokenizer._require(tokenizer.eos_id, "EOS"), "</s>")
        self.stop_ids = frozenset({self.eos.id})

    def _pieces(self, messages, add_generation_prompt, tools):
        if tools:
            raise GenerationError("Llama 2 chat has no tool-calling format")
        msgs = normalize_messages(messages, ("system", "user", "assistant"))
        turns = [(i, m["role"], _text_of(m["content"], f"message {i}")) for i, m in enumerate(msgs)]
        if turns and turns[0][1] == "system":
            if len(turns) < 2:
                raise GenerationError("message 0: a system message must be followed by a user message")
            (_, _, system), (i, role, first) = turns[0], turns[1]
            turns = [(i, role, self.B_SYS + system + self.E_SYS + first)] + turns[2:]
        for n, (i, role, _) in enumerate(turns):
            want = "user" if n % 2 == 0 else "assistant"
            if role != want:
                raise GenerationError(f"message {i}: Llama 2 chat needs user/assistant turns alternating, got {role!r}")
        if not turns or turns[-1][1] != "user":
            raise GenerationError(f"message {len(msgs) - 1}: the last message must be from the user")
        pieces: list[Piece] = []
        for (_, _, user), (_, _, answer) in zip(turns[0::2], turns[1::2], strict=False):
            pieces += [self.bos, f"{self.B_INST} {user.strip()} {self.E_INST} {answer.strip()} ", self.eos]
        pieces += [self.bos, f"{self.B_INST} {turns[-1][2].strip()} {self.E_INST}"]
        return pieces


# ================================================================================================ Llama 3 / 4


class _HeaderChatFormat(ChatFormat):
    """Shared header/body/end-of-message layout of Meta's Llama 3 and Llama 4 ChatFormat."""

    START = END = EOT = EOM = ""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.bos = self._tok("<|begin_of_text|>")
        self.start, self.end, self.eot = self._tok(self.START), self._tok(self.END), self._tok(self.EOT)

    def _header(self, role: str) -> list[Piece]:
        # Meta encodes the role and the "\n\n" as two separate texts
        return [self.start, "ipython" if role in ("tool", "ipython") else role, self.end, "\n\n"]

    def _content(self, content: Any, where: str) -> list[Piece]:
        if isinstance(content, str):
            return [content]
        pieces: list[Piece] = []
        for part in content:  # each part encoded on its own, as Meta does
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                pieces += self._image(part, where)
            else:
                pieces.append(_text_of([part], where))
        return pieces

    def _image(self, part: dict, where: str) -> list[Piece]:
        raise GenerationError(f"{where}: this chat format takes no images")

    def _message(self, m: dict, where: str) -> list[Piece]:
        raise NotImplementedError

    def _pieces(self, messages, add_generation_prompt, tools):
        msgs = _with_tools(normalize_messages(messages), tools)
        pieces: list[Piece] = [self.bos]
        for i, m in enumerate(msgs):
            pieces += self._message(m, f"message {i}")
        if add_generation_prompt:
            pieces += self._header("assistant")
        return pieces

    def _split_reply(self, text: str, python_start: str) -> tuple[str, bool]:
        """Strip the assistant header, a leading python tag and a trailing end token (Meta's decode)."""
        content = text.strip(" ")
        header = f"{self.START}assistant{self.END}\n\n"
        if content.startswith(header):
            content = content[len(header) :]
        python = content.startswith(python_start)
        if python:
            content = content[len(python_start) :]
        for end in (self.EOT, self.EOM):
            if content.endswith(end):
                content = content[: -len(end)]
                break
        return content, python


class Llama3ChatFormat(_HeaderChatFormat):
    """Meta Llama 3.x chat format (llama_models.llama3.chat_format); version "3.0" = original Llama 3 repo."""

    START, END, EOT, EOM = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"
    IMAGE_ID = 128256  # Meta's ChatFormat rewrites <|image|> (128011) to the vision model's extra embedding row

    def __init__(self, tokenizer: Tokenizer, version: str = "3.1") -> None:
        super().__init__(tokenizer)
        self.version = version
        if version == "3.0":
            self.stop_ids = frozenset({tokenizer._require(tokenizer.eos_id, "EOS"), self.eot.id})
        else:
            self.eom, self.python_tag = self._tok(self.EOM), self._tok("<|python_tag|>")
            self.stop_ids = frozenset({tokenizer._require(tokenizer.eos_id, "EOS"), self.eot.id, self.eom.id})

    def _image(self, part, where):
        return [Tok(self.IMAGE_ID, "<|image|>")]

    def _message(self, m, where):
        pieces = self._header(m["role"])
        if self.version == "3.0":  # llama3 repo: content.strip(), always <|eot_id|>, no tools
            if m["tool_calls"]:
                raise GenerationError(f"{where}: Llama 3.0 has no tool-call format")
            return pieces + [_text_of(m["content"], where).strip(), self.eot]
        calls = m["tool_calls"]
        if m["role"] == "assistant" and calls and calls[0]["name"] == "code_interpreter":
            pieces.append(self.python_tag)
        pieces += self._content(m["content"], where)
        pieces += [_encode_tool_call(c) for c in calls]
        # eom ends an assistant turn that waits for a tool result; Meta takes it from stop_reason, herd
        # defaults it from the presence of tool calls.
        stop = m["stop_reason"] or ("end_of_message" if calls else "end_of_turn")
        pieces.append(self.eom if m["role"] == "assistant" and stop == "end_of_message" else self.eot)
        return pieces

    def parse_reply(self, text: str) -> dict:
        content, python = self._split_reply(text, "<|python_tag|>")
        call = _parse_tool_reply(content, python)
        return _assistant(content, call)


class Llama4ChatFormat(_HeaderChatFormat):
    """Meta Llama 4 chat format (llama_models.llama4.chat_format), with early-fusion image tokens."""

    START, END, EOT, EOM = "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>"

    def __init__(self, tokenizer: Tokenizer, patches_per_tile: int = 144) -> None:
        super().__init__(tokenizer)
        self.eom = self._tok(self.EOM)
        self.patches_per_tile = patches_per_tile  # (336/14)^2 patches, pixel-shuffled by 0.5 -> 144 (SPEC.md §5)
        self.stop_ids = frozenset({tokenizer._require(tokenizer.eos_id, "EOS"), self.eot.id, self.eom.id})

    def _image(self, part, where):
        """<|image_start|> tiles (row-major, x/y separators) <|image|> global tile <|image_end|>; one tile ->
        <|image_start|><|image|> patches <|image_end|>. The caller gives the tile grid as aspect_ratio [rows, cols]."""
        rows, cols = part.get("aspect_ratio") or (1, 1)
        if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1):
            raise GenerationError(
                f"{where}: image aspect_ratio must be [rows, cols] >= 1, got {part.get('aspect_ratio')}"
            )
        patches = [self._tok("<|patch|>")] * self.patches_per_tile
        out: list[Piece] = [self._tok("<|image_start|>")]
        if (rows, cols) != (1, 1):
            for _ in range(rows):
                for c in range(cols):
                    out += patches + ([self._tok("<|tile_x_separator|>")] if c < cols - 1 else [])
                out.append(self._tok("<|tile_y_separator|>"))
        return out + [self._tok("<|image|>")] + patches + [self._tok("<|image_end|>")]

    def _message(self, m, where):
        pieces = self._header(m["role"]) + self._content(m["content"], where)
        pieces += [_encode_tool_call(c) for c in m["tool_calls"]]
        if m["role"] == "assistant":
            eom = m["stop_reason"] == "end_of_message" or bool(m["tool_calls"])
        else:
            eom = m["role"] in ("tool", "ipython")  # tool results end with <|eom|>
        return pieces + [self.eom if eom else self.eot]

    def parse_reply(self, text: str) -> dict:
        content, python = self._split_reply(text, "<|python_start|>")
        if python:
            content = content.replace("<|python_end|>", "")
        return _assistant(content, _parse_tool_reply(content, python))


# ================================================================================================ Jinja


def _jinja_env():
    """A sandboxed jinja2 environment with the helpers transformers gives chat templates."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class JinjaChatFormat(ChatFormat):
    """A HF / GGUF `chat_template`; the rendered text is encoded with specials recognised and no extra BOS."""

    source = "the chat template"  # where it came from (a checkpoint's file, the caller), named in errors

    def __init__(self, tokenizer: Tokenizer, template: str, **template_vars: Any) -> None:
        import jinja2

        super().__init__(tokenizer)
        try:
            self.template = _jinja_env().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise FormatError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None
        self.template_vars = template_vars
        self.stop_ids = tokenizer.stop_ids

    def _special_text(self, i: int | None) -> str | None:
        return None if i is None else self.tokenizer.id_to_token(i)

    def render(self, messages, *, add_generation_prompt=True, tools=None, **template_vars) -> str:
        import jinja2

        normalize_messages(messages)  # same checks as the Meta formats
        msgs = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}  # as transformers: a None key is an absent key
            if m.get("tool_calls"):
                m["tool_calls"] = [_json_arguments(c) for c in m["tool_calls"]]
            msgs.append(m)
        names = {"bos_token": self.tokenizer.bos_id, "eos_token": self.tokenizer.eos_id,
                 "pad_token": self.tokenizer.pad_id}  # fmt: skip
        context = {k: self._special_text(i) for k, i in names.items()}
        context.update(self.template_vars, **template_vars)
        try:
            return self.template.render(messages=msgs, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **context)  # fmt: skip
        except jinja2.TemplateError as e:
            raise GenerationError(f"chat template rejected the messages: {e}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            # a plain text template concatenates content as a string: a list of parts fails inside jinja
            if any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") not in
                                                              ("text", "input_text") for p in m["content"])
                   for m in msgs):
                raise GenerationError(f"{self.source} cannot render image parts ({type(e).__name__}: {e}); give a "
                                      f"template that can with --chat-template FILE_OR_STRING (herd.load(..., "
                                      f"chat_template=TEXT))") from None
            raise GenerationError(f"{self.source} failed on these messages ({type(e).__name__}: {e})") from None

    def encode_dialog(self, messages, *, add_generation_prompt=True, tools=None, **template_vars) -> list[int]:
        text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_vars)
        return self.tokenizer.encode(text, allow_special=True)

    def parse_reply(self, text: str) -> dict:
        """Tool calls as '<tool_call>{json}</tool_call>' or a bare {"name", "parameters"|"arguments"} JSON reply."""
        content = text.strip()
        for stop in self.stop_ids:
            t = self.tokenizer.id_to_token(stop)
            if content.endswith(t):
                content = content[: -len(t)].rstrip()
        calls = []
        for block in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", content, flags=re.S) or [content]:
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append((obj["name"], obj.get("arguments", obj.get("parameters", {}))))
        if not calls:
            return {"role": "assistant", "content": content}
        msg = _assistant("", calls[0])
        for call in calls[1:]:
            msg["tool_calls"] += _assistant("", call)["tool_calls"]
        return msg


def _json_arguments(call: dict) -> dict:
    """A tool call whose function.arguments JSON string is parsed into a dict (templates `tojson` it)."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            return call
        return {**call, "function": {**fn, "arguments": args}}
    return call


# ================================================================================================ choice


def load_chat_template(value: str) -> str:
    """A --chat-template value -> template text: a template file (Jinja text, or a tokenizer_config.json with a
    chat_template), else the value itself when it is a Jinja template; FormatError naming the value otherwise."""
    from pathlib import Path

    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a template's text can be too long, or hold NUL, for a file name
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"chat template file {path}: cannot be read as UTF-8 text ({e})") from None
        if path.suffix == ".json":
            try:
                template = json.loads(text).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise FormatError(f"chat template file {path}: not a JSON object ({e})") from None
            if isinstance(template, list):  # named templates: the default one
                template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
            if not isinstance(template, str):
                raise FormatError(f"chat template file {path}: a JSON file needs a chat_template string")
            return template
        return text
    if "{{" in value or "{%" in value:
        return value
    raise FormatError(f"chat template {value[:80]!r}: no such file, and not a Jinja template (no '{{{{' or '{{%')")


def chat_format_for(tokenizer: Tokenizer, family: str, chat_template: str | None = None) -> ChatFormat:
    """The chat format for a model family; a shipped `chat_template` wins (pass None for Meta's format)."""
    if chat_template:
        return JinjaChatFormat(tokenizer, chat_template)
    specials = tokenizer.special_tokens
    if family == "llama":  # generic: guess from the vocabulary
        if "<|header_start|>" in specials:
            family = "llama4"
        elif "<|start_header_id|>" in specials:
            family = "llama3.1" if "<|eom_id|>" in specials else "llama3"
        elif tokenizer.kind == "spm":
            family = "llama2"
        else:
            raise ConfigError(f"cannot tell the chat format of tokenizer {tokenizer.source}; give a chat_template")
    if family == "llama2":
        return Llama2ChatFormat(tokenizer)
    if family == "llama3":
        return Llama3ChatFormat(tokenizer, version="3.0")
    if family in ("llama3.1", "llama3.2", "llama3.3"):
        return Llama3ChatFormat(tokenizer)
    if family == "llama4":
        return Llama4ChatFormat(tokenizer)
    raise ConfigError(f"unknown model family {family!r} (llama2, llama3, llama3.1, llama3.2, llama3.3, llama4, llama)")
