"""User-defined YAML tasks: the harness's template semantics, data sources and errors."""

import json

import pytest

from libmoe.eval import evaluate_tasks, get_task, load_records
from libmoe.eval.yaml_tasks import load_task_file

RECORDS = [
    {"country": "France", "options": ["Paris", "Lyon", "Nice"], "answer": "Paris", "label": 0},
    {"country": "Japan", "options": ["Osaka", "Tokyo", "Kyoto"], "answer": "Tokyo", "label": 1},
    {"country": "Peru", "options": ["Cusco", "Lima", "Piura"], "answer": "Lima", "label": 1},
]


def write(tmp_path, body, records=RECORDS, name="capitals"):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


class LengthScorer:
    """Shorter continuations are more likely."""

    def __init__(self):
        self.requests = []

    def loglikelihood(self, requests, desc=None):
        self.requests += requests
        return [(-float(len(cont)), len(cont) < 6) for _, cont in requests]


def test_templates_build_context_choices_and_gold(tmp_path):
    path = write(tmp_path, 'data: capitals.jsonl\ndoc_to_text: "Q: What is the capital of '
                 '{{country}}?\\nA:"\ndoc_to_choice: "{{options}}"\ndoc_to_target: answer\n')
    task = load_task_file(path)
    assert task.name == "capitals" and task.kind == "multiple_choice"
    docs = [task.to_doc(r) for r in load_records(task)]
    assert docs[1].context == "Q: What is the capital of Japan?\nA:"
    assert docs[1].choices == ["Osaka", "Tokyo", "Kyoto"] and [d.gold for d in docs] == [0, 1, 1]
    # The gold may also be an index, from a field or a template; choices a literal YAML list.
    by_index = load_task_file(write(tmp_path, 'task: caps2\ndata: capitals.jsonl\ndoc_to_text: '
                                    '"{{country}}:"\ndoc_to_choice: ["a", "bb", "ccc"]\n'
                                    'doc_to_target: "{{label + 1}}"\n', name="c2"))
    assert by_index.name == "caps2"
    assert [by_index.to_doc(r).gold for r in RECORDS] == [1, 2, 2]
    assert by_index.to_doc(RECORDS[0]).choices == ["a", "bb", "ccc"]


def test_evaluates_by_path_like_a_registered_task(tmp_path):
    path = write(tmp_path, 'data: capitals.jsonl\ndoc_to_text: "{{country}}\'s capital is"\n'
                 'doc_to_choice: "{{options}}"\ndoc_to_target: label\n')
    scorer = LengthScorer()
    results = evaluate_tasks(scorer, [str(path)], data_dir="/nonexistent", limit=2)
    # The shortest choice wins: Lyon (not Paris), Osaka (ties go to the first; not Tokyo), Lima.
    assert results["capitals"]["n"] == 2 and results["capitals"]["acc"] == 0.0
    assert evaluate_tasks(scorer, [str(path)])["capitals"]["acc"] == pytest.approx(1 / 3)
    assert scorer.requests[0] == ("France's capital is", " Paris")
    assert get_task(str(path)).name == "capitals"


def test_multiple_input_and_loglikelihood_tasks(tmp_path):
    records = [{"sentence": "Ann thanked Bo because _ helped.", "option1": "Ann", "option2": "Bo",
                "answer": "2"}]
    wino = load_task_file(write(
        tmp_path, "data: wino.jsonl\ndoc_to_text: \"{{ {'1': 0, '2': 1}[answer] }}\"\n"
        "doc_to_choice: \"{{ [sentence.split('_')[0] + option1, sentence.split('_')[0] + option2] }}\"\n"
        "doc_to_target: \"{{ sentence.split('_')[1].strip() }}\"\n", records, name="wino"))
    doc = wino.to_doc(records[0])
    assert wino.requests(doc) == [("Ann thanked Bo because Ann", " helped."),
                                  ("Ann thanked Bo because Bo", " helped.")] and doc.gold == 1
    lam = load_task_file(write(tmp_path, "data: lam.jsonl\noutput_type: loglikelihood\n"
                               "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                               "doc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\n",
                               [{"text": "the cat sat"}, {"text": "a dog barked loudly"}], name="lam"))
    assert lam.requests(lam.to_doc({"text": "the cat sat"})) == [("the cat", " sat")]
    results = evaluate_tasks(LengthScorer(), [str(tmp_path / "lam.yaml")])
    assert results["lam"]["acc"] == 0.5  # " sat" is greedy (< 6 chars), " loudly" is not


def test_rolling_task_reports_word_and_byte_perplexity(tmp_path):
    class Rolling:
        def loglikelihood_rolling(self, texts, desc=None):
            return [-2.0 * len(t.split()) for t in texts]

    path = write(tmp_path, "data: wiki.jsonl\noutput_type: loglikelihood_rolling\ndoc_to_target: page\n",
                 [{"page": "one two three"}, {"page": "four"}], name="wiki")
    r = evaluate_tasks(Rolling(), [str(path)])["wiki"]
    assert r["word_perplexity"] == pytest.approx(2.718281828 ** 2)  # -8 over 4 words
    assert r["bits_per_byte"] == pytest.approx(8 / 17 / 0.6931471805599453)  # 13 + 4 bytes


def test_the_harness_form_of_the_data_source(tmp_path):
    write(tmp_path, "unused: 1\n")
    spec = (f"task: caps_h\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tmp_path / 'capitals.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: \"{{country}}\"\ndoc_to_choice: \"{{options}}\"\ndoc_to_target: answer\n"
            "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    path = tmp_path / "harness.yaml"
    path.write_text(spec)
    task = load_task_file(path)
    assert task.name == "caps_h" and len(load_records(task)) == 3


@pytest.mark.parametrize("body, match", [
    ("data: capitals.jsonl\ndoc_to_text: x\ndoc_to_choice: '{{options}}'\ndoc_to_target: answer\n"
     "process_docs: foo\n", "unsupported key.*process_docs.*Python hooks"),
    ("data: capitals.jsonl\ndoc_to_text: !function utils.doc_to_text\n", "!function are not supported"),
    ("task: piqa\ndata: capitals.jsonl\ndoc_to_choice: '{{options}}'\ndoc_to_target: answer\n",
     "'piqa' is a built-in task"),
    ("doc_to_choice: '{{options}}'\ndoc_to_target: answer\n", "name the data with `data: FILE.jsonl`"),
    ("data: capitals.jsonl\ndoc_to_target: answer\n", "needs doc_to_choice"),
    ("data: capitals.jsonl\noutput_type: generate_until\n", "output_type 'generate_until' is not supported"),
    ("data: capitals.jsonl\nnum_fewshot: 5\ndoc_to_choice: '{{options}}'\ndoc_to_target: answer\n",
     "num_fewshot 5 is not supported"),
    ("data: [capitals.jsonl\n", "is not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of task keys"),
])
def test_bad_task_files_say_what_is_wrong(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        load_task_file(write(tmp_path, body))


def test_bad_records_and_missing_files(tmp_path):
    path = write(tmp_path, "data: capitals.jsonl\ndoc_to_text: '{{contry}}'\ndoc_to_choice: "
                 "'{{options}}'\ndoc_to_target: answer\n")
    with pytest.raises(ValueError, match="'contry' is undefined"):
        load_task_file(path).to_doc(RECORDS[0])
    wrong = write(tmp_path, "data: capitals.jsonl\ndoc_to_text: '{{country}}'\ndoc_to_choice: "
                  "'{{options}}'\ndoc_to_target: Berlin\n", name="wrong")
    with pytest.raises(ValueError, match="target 'Berlin' is neither a choice index"):
        load_task_file(wrong).to_doc(RECORDS[0])
    gone = write(tmp_path, "data: elsewhere.jsonl\ndoc_to_choice: '{{options}}'\ndoc_to_target: answer\n",
                 name="gone")
    with pytest.raises(FileNotFoundError, match="elsewhere.jsonl.*does not exist"):
        load_records(load_task_file(gone))
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_task_file(tmp_path / "nope.yaml")
