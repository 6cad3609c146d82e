"""ipywidgets chat over :func:`dsv4lib.generate.generate` (STYLE.md §12: widgets wrap pure functions).

:func:`chat_ui` returns a widget box (prompt box, temperature, max new tokens, thinking toggle,
send / reset buttons, streamed output). The conversation is a list of V4 chat messages held by the
box itself (``box.messages``); each send calls ``generate`` on the whole conversation with a
``stream`` callback that appends decoded text to the output as it arrives. Only notebook 04 uses
this, and only with ``interactive=True``: papermill runs fixed prompts through
:func:`dsv4lib.report.run_prompts` instead.
"""
from __future__ import annotations

from dsv4lib.chat import parse_completion
from dsv4lib.generate import generate


def chat_ui(model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.0, thinking: bool = False,
            system: str | None = None):
    """A multi-turn chat box over ``generate(model, tokenizer, messages, ...)``."""
    import ipywidgets as W

    prompt = W.Textarea(placeholder="Message (Shift+Enter is a newline; press Send)", layout=W.Layout(width="100%"))
    temp = W.FloatSlider(value=temperature, min=0.0, max=1.5, step=0.05, description="temperature")
    max_new = W.IntSlider(value=max_new_tokens, min=1, max=1024, step=1, description="max tokens")
    think = W.Checkbox(value=thinking, description="thinking")
    send, reset = W.Button(description="Send", button_style="primary"), W.Button(description="Reset")
    log = W.Textarea(layout=W.Layout(width="100%", height="320px"), disabled=True)
    box = W.VBox([log, prompt, W.HBox([temp, max_new, think]), W.HBox([send, reset])])
    box.messages = [{"role": "system", "content": system}] if system else []

    def on_send(_):
        text, prompt.value = prompt.value.strip(), ""
        if not text:
            return
        box.messages.append({"role": "user", "content": text})
        log.value += f"\n> {text}\n"

        def stream(chunk: str) -> None:
            log.value += chunk

        r = generate(model, tokenizer, box.messages, max_new_tokens=max_new.value, temperature=temp.value,
                     thinking=think.value, stream=stream)
        box.messages.append({"role": "assistant", **parse_completion(r.text, think.value)})
        log.value += f"\n[{r.n_new} tokens, {r.tokens_per_s:.1f} tok/s, stop: {r.stop_reason}]\n"

    def on_reset(_):
        del box.messages[int(bool(system)):]
        log.value = ""

    send.on_click(on_send)
    reset.on_click(on_reset)
    return box
