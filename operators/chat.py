"""Chat templates: a prompt (or prior turns) and a response → the ids an instruction-tuned
model saw in training, rendered by the tokenizer's own template.

``template="auto"`` formats a sample as user/assistant turns when the tokenizer carries a chat
template; ``plain`` (or a tokenizer without one) keeps raw prompt text. Fitting, scoring, IBO,
evaluation and generation all go through ``prompt_ids`` / ``chat_split`` so they see one format.
"""

from __future__ import annotations

from jinja2 import TemplateError

from operators.errors import UserError

TEMPLATES = ("auto", "plain")
Turns = list[dict[str, str]]  # chat turns: {"role": "user" | "assistant" | "system", "content"}


class ChatTemplateError(UserError):
    """The tokenizer's chat template does not compile, or raises on a conversation."""


def uses_chat_template(tokenizer, template: str = "auto") -> bool:
    """Whether samples are formatted as chat turns: ``auto`` and a tokenizer with a template."""
    if template not in TEMPLATES:
        raise UserError(f"data.template={template!r}: expected one of {TEMPLATES}")
    return template == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, *, turns: Turns | None = None,
               template: str = "auto") -> list[int]:
    """The ids a response (or a generation) follows: the same prefix ``encode`` produces."""
    if uses_chat_template(tokenizer, template):
        return _with_bos(tokenizer, _render(tokenizer, _conversation(prompt, turns), True))
    return _with_bos(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])


def keep_end(tokenizer, ids: list[int], length: int) -> list[int]:
    """The last ``length`` ids, keeping a leading BOS in front of them."""
    if len(ids) <= length:
        return ids
    bos = tokenizer.bos_token_id
    if ids[0] == bos and bos is not None and length > 1:
        return [bos] + ids[len(ids) - length + 1:]
    return ids[len(ids) - length:]


def chat_split(tokenizer, prompt: str, turns: Turns | None, response: str
               ) -> tuple[list[int], list[int]]:
    """Prompt and assistant-turn ids from the template, the loss on the assistant turn only.

    The template over [turns…, assistant] normally starts with the template over [turns…] plus
    the generation prompt, token for token; the response is what follows. A template that
    breaks that prefix property (one that rewrites earlier turns, or tokens merging across the
    boundary) falls back to tokenizing the text that follows the rendered prompt, and a
    template whose text is not a prefix either to the response's own tokens plus EOS.
    """
    conversation = _conversation(prompt, turns)
    p_text = _render_text(tokenizer, conversation, True)
    full_text = _render_text(tokenizer, conversation + [
        {"role": "assistant", "content": response}], False)
    p_ids = _with_bos(tokenizer, _tokens(tokenizer, p_text))
    full = _with_bos(tokenizer, _tokens(tokenizer, full_text))
    if full[:len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids):]
    if full_text.startswith(p_text) and len(full_text) > len(p_text):
        return p_ids, _tokens(tokenizer, full_text[len(p_text):])
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return p_ids, _tokens(tokenizer, response) + eos


def _conversation(prompt: str, turns: Turns | None) -> Turns:
    return list(turns) if turns else [{"role": "user", "content": prompt}]


def _render_text(tokenizer, conversation: Turns, generation_prompt: bool) -> str:
    """The template's text; its failure (a syntax error, a ``raise_exception`` on turns it does
    not support, such as a system turn) is the model folder's, not a bug here."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:
        folder = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatTemplateError(f"{folder}: its chat template fails ({type(err).__name__}: "
                                f"{err}); fix it or set data.template=plain") from err


def _render(tokenizer, conversation: Turns, generation_prompt: bool) -> list[int]:
    return _tokens(tokenizer, _render_text(tokenizer, conversation, generation_prompt))


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prepend BOS where the tokenizer itself adds one and ``ids`` lack it (never twice)."""
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos]:
        return ids
    adds = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return [bos] + ids if adds else ids
