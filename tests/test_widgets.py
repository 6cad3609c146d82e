"""The notebook-04 chat widget drives generate() headlessly: a click streams text into the log,
records both turns, and reset clears the conversation (what JupyterLab users do by hand)."""
import pytest

pytest.importorskip("ipywidgets")


def test_chat_ui_send_and_reset_on_the_embedded_model():
    from dsv4lib.checkpoint import load_model
    from dsv4lib.generate import generate
    from dsv4lib.paths import EMBEDDED_REF
    from dsv4lib.tokenizer import load_tokenizer
    from dsv4lib.widgets import chat_ui

    model, tok = load_model(EMBEDDED_REF), load_tokenizer(EMBEDDED_REF)
    box = chat_ui(model, tok, max_new_tokens=8, temperature=0.0)
    log, prompt = box.children[0], box.children[1]
    send, reset = box.children[3].children
    prompt.value = "What is love?"
    send.click()
    assert prompt.value == ""
    assert [m["role"] for m in box.messages] == ["user", "assistant"]
    expected = generate(model, tok, [{"role": "user", "content": "What is love?"}], max_new_tokens=8,
                        temperature=0.0).text
    assert expected.strip() and expected in log.value            # streamed chunks add up to the greedy answer
    reset.click()
    assert box.messages == [] and log.value == ""
