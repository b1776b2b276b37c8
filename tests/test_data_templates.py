import pytest

from tailorlm.config import TemplateSpec
from tailorlm.data.templates import PromptTemplate
from tailorlm.errors import ConfigError, DataError

LABELS = ["negative", "positive"]


def test_classification_preset_renders_instruction_text_and_label():
    template = PromptTemplate(TemplateSpec())
    ex = {"text": "A fine film.", "label": "positive"}
    assert template.prompt(ex, LABELS) == "Classify the text. Answer with one of: negative, positive.\n\nText: A fine film."
    assert template.completion(ex) == "positive"
    assert template.fields == {"text", "label"}
    assert template.label_field == "label"


def test_custom_templates_see_every_field():
    spec = TemplateSpec(instruction="Sentiment of a {{ source }} review ({{ labels | length }} options)?",
                        prompt="{{ instruction }}\nReview: {{ text | upper }}", completion="{{ label }}")
    template = PromptTemplate(spec)
    assert template.fields == {"source", "text", "label"}
    assert template.prompt({"source": "film", "text": "ok", "label": "x"}, LABELS) == \
        "Sentiment of a film review (2 options)?\nReview: OK"


def test_template_errors_are_clear():
    with pytest.raises(ConfigError, match=r"template.prompt \(template line 2\): unexpected end of template"):
        PromptTemplate(TemplateSpec(prompt="{{ instruction }}\n{{ text"))
    template = PromptTemplate(TemplateSpec(prompt="{{ instruction }} {{ title }}"))
    with pytest.raises(DataError, match=r"d.csv, line 4: template.prompt: 'title' is undefined"):
        template.prompt({"text": "t", "label": "x", "_where": "d.csv, line 4"}, LABELS)


def test_templates_are_sandboxed():
    template = PromptTemplate(TemplateSpec(prompt="{{ text.__class__.__mro__ }}"))
    with pytest.raises(Exception, match="unsafe|access to attribute"):
        template.prompt({"text": "x", "label": "y"}, LABELS)
