from tailorlm.config import TemplateSpec
from tailorlm.data.samples import IGNORE
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples

LABELS = ["negative", "positive"]
EX = {"text": "the film won an award", "label": "positive", "_where": "d.csv, line 2"}


def encode(tokenizer, examples, **spec):
    spec = TemplateSpec(**spec)
    return encode_examples(examples, PromptTemplate(spec), ChatFormat(tokenizer, spec), LABELS, spec)


def test_loss_mask_covers_exactly_the_completion(tiny_tokenizer):
    (sample,), report = encode(tiny_tokenizer, [EX])
    n_prompt = sample.labels.count(IGNORE)
    assert all(label == IGNORE for label in sample.labels[:n_prompt])
    assert sample.labels[n_prompt:] == sample.input_ids[n_prompt:]
    # The completion is the answer and the end-of-turn token, nothing else.
    assert tiny_tokenizer.decode(sample.input_ids[n_prompt:]) == "positive<|im_end|>"
    # The prompt is token for token what generation is fed.
    messages = [{"role": "user", "content": PromptTemplate(TemplateSpec()).prompt(EX, LABELS)}]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert sample.prompt_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert rendered.endswith("<|im_start|>assistant\n")
    assert report.summary() == "1/1 kept, 0 truncated to fit, dropped: none"


def test_system_prompt_and_plain_layout_without_chat_template(tiny_tokenizer):
    (chat,), _ = encode(tiny_tokenizer, [EX], system="Be brief.")
    assert tiny_tokenizer.decode(chat.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    (plain,), _ = encode(tiny_tokenizer, [EX], chat_template="never")
    text = tiny_tokenizer.decode(plain.input_ids)
    assert text.endswith("Text: the film won an award\nAnswer: positive<|im_end|>")
    assert tiny_tokenizer.decode(plain.input_ids[plain.labels.count(IGNORE):]) == " positive<|im_end|>"


def test_overlong_samples_are_truncated_on_the_input_field_or_dropped(tiny_tokenizer):
    long = {**EX, "text": "the market rose as shares in the bank climbed " * 20}
    samples, report = encode(tiny_tokenizer, [EX, long], max_length=60)
    assert report.truncated == 1 and report.kept == 2
    assert all(len(s) <= 60 for s in samples)
    shortened = samples[1]
    assert shortened.example["text"].endswith(" ...") and len(shortened.example["text"]) < len(long["text"])
    # The answer survives truncation: only the input field is cut, never the template or the label.
    assert tiny_tokenizer.decode(shortened.input_ids[shortened.labels.count(IGNORE):]) == "positive<|im_end|>"
    samples, report = encode(tiny_tokenizer, [EX, long], max_length=60, overlong="drop")
    assert report.kept == 1 and report.dropped == {"longer than max_length=60": 1}
    assert "1/2 kept, 0 truncated to fit, dropped: 1 longer than max_length=60" == report.summary()
