"""The comparison table in the terminal and report.md: a trivial or contaminated test score is marked as such."""
from tailorlm.eval.report import comparison_rows, print_table, score_notes, write_report

COLUMNS = ("accuracy", "macro_f1")
VARIANTS = {"zero_shot": {"accuracy": 0.5, "macro_f1": 0.4}, "fine_tuned": {"accuracy": 1.0, "macro_f1": 1.0}}
TRIVIAL = ["every test example has the label 'b', so always answering it scores 1.000"]
CONTAMINATED = {"test_rows": 4, "in_train": 3, "share": 0.75, "exact": 2, "near": 1, "near_checked": True}


def test_score_notes_name_why_the_score_is_no_result():
    assert score_notes(TRIVIAL, CONTAMINATED) == [
        "test score trivial: every test example has the label 'b', so always answering it scores 1.000",
        "test score contaminated: 3 of 4 test rows (75%) also occur in train (2 exactly, 1 nearly)"]
    assert score_notes([], {**CONTAMINATED, "in_train": 1, "share": 0.004, "near": 0, "test_rows": 250}) == [
        "test score contaminated: 1 of 250 test rows (under 1%) also occur in train"]
    assert score_notes([], {**CONTAMINATED, "in_train": 0, "share": 0.0}) == []
    assert score_notes([], None) == []


def test_a_trivial_score_shows_no_gain_over_prompting():
    gain = len(COLUMNS) + 1  # the 'vs prompting' column
    assert comparison_rows(VARIANTS, COLUMNS)[1][:gain + 1] == ("fine-tuned", "1.000", "1.000", "+50.0 pts")
    assert comparison_rows(VARIANTS, COLUMNS, trivial=True)[1][:gain + 1] == ("fine-tuned", "1.000", "1.000", "trivial")


def test_report_md_marks_the_table(tmp_path):
    section = {"columns": list(COLUMNS), "variants": VARIANTS, "labels": ["a", "b"], "n_test": 4,
               "trivial": TRIVIAL, "contamination": CONTAMINATED}
    write_report(tmp_path / "report.md", "run", {}, {"task": section})
    lines = (tmp_path / "report.md").read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| fine-tuned |"))
    assert lines[row].startswith("| fine-tuned | 1.000 | 1.000 | trivial |")
    first = lines.index("- **test score trivial: every test example has the label 'b', so always answering it "
                        "scores 1.000**")
    assert first > row and lines[first - 1] == "" and lines[first + 1] == (
        "- **test score contaminated: 3 of 4 test rows (75%) also occur in train (2 exactly, 1 nearly)**")
    assert lines.index("## Loss") > first  # beside the table, not after the training section


def test_report_md_without_marks_is_unchanged(tmp_path):
    section = {"columns": list(COLUMNS), "variants": VARIANTS, "labels": ["a", "b"], "n_test": 4}
    write_report(tmp_path / "report.md", "run", {}, {"task": section})
    report = (tmp_path / "report.md").read_text()
    assert "| fine-tuned | 1.000 | 1.000 | +50.0 pts |" in report
    assert "test score" not in report and "trivial" not in report


def test_terminal_table_is_followed_by_the_marks(capsys):
    print_table(VARIANTS, 4, COLUMNS, None, TRIVIAL, CONTAMINATED)
    out = capsys.readouterr().out
    lines = out.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("└"))
    assert lines[table_end + 1:table_end + 3] == [  # right under the table, before the other lines
        "test score trivial: every test example has the label 'b', so always answering it scores 1.000",
        "test score contaminated: 3 of 4 test rows (75%) also occur in train (2 exactly, 1 nearly)"]
    assert " trivial │" in out  # the fine-tuned row's gain cell


def test_the_majority_class_row_and_a_model_that_learned_only_the_prior():
    from tailorlm.eval.classic import majority_class

    # the most frequent training label for every row; a tie goes to the first label in sorted order
    assert majority_class(["b", "a", "b", "c"], 3).predicted == ["b", "b", "b"]
    assert majority_class(["c", "a", "c", "a"], 2).predicted == ["a", "a"]
    variants = {"majority": {"kind": "majority class", "label": "sport", "accuracy": 0.62, "macro_f1": 0.153},
                "fine_tuned": {"accuracy": 0.625, "macro_f1": 0.383},
                "fine_tuned_constrained": {"accuracy": 0.90, "macro_f1": 0.88}}
    assert comparison_rows(variants, COLUMNS)[0][:3] == ("majority class (sport)", "0.620", "0.153")
    assert score_notes([], None, variants) == [
        "fine-tuned: accuracy 0.625 against 0.620 for always answering 'sport': it learned little beyond the label "
        "prior (macro-F1 0.383)"]
    assert score_notes([], None, {**variants, "fine_tuned": {"accuracy": 0.64, "macro_f1": 0.5}}) == []
