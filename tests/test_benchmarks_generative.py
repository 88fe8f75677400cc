"""``unimm eval --benchmark`` for the generative benchmarks (VQAv2, GQA, VizWiz, TextVQA, POPE, MME,
ScienceQA-IMG, MMBench): the grading rules against values worked out by hand, miniature copies
in the releases' layouts scored end to end (replies checked against the model's own generation,
and graded again by hand), the layouts' quirks and bad input."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from tests.helpers import make_image
from tests.test_benchmarks import COLOURS, WORDS, eval_benchmark, load
from unimm.errors import UnimmError

# ---------------------------------------------------------------------------------------------
# Grading rules, by hand


def test_vqa_accuracy_worked_by_hand():
    from unimm.benchmarks.scoring import normalize_vqa_answer, vqa_accuracy

    # 3 of 10 annotators said red: leaving out one of them leaves 2 (2/3), one of the others 3 (1)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    # the answer processing: number words, articles, punctuation, contractions, case
    assert vqa_accuracy("Two.", ["2"] * 9 + ["3"]) == 1.0
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("The cat") == "cat"
    assert normalize_vqa_answer("dont") == "don't" and normalize_vqa_answer("couldnt've") == "couldn't've"
    assert normalize_vqa_answer("1,000") == "1000"  # a comma between digits: punctuation dropped
    assert normalize_vqa_answer("left/right") == "left right"  # no space around: becomes one
    assert normalize_vqa_answer("3.5") == "3.5" and normalize_vqa_answer("yes.") == "yes"
    # the human answers are normalised only when they differ, as the official script does
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["no"]) == 1.0


def test_yes_no_rules_of_pope_and_mme():
    from unimm.benchmarks.scoring import binary_scores, yes_no

    assert yes_no("No, there is no dog.") == "no"
    assert yes_no("There is not a dog in the image") == "no"
    assert yes_no("Yes, there is a dog. No other animal.") == "yes"  # the first sentence only
    assert yes_no("NO") == "yes"  # POPE's script matches No, no and not only
    assert yes_no("Yes.", "mme") == "yes" and yes_no("No, it isn't", "mme") == "no"
    assert yes_no("yes and no", "mme") == "yes" and yes_no("I think so", "mme") == "other"
    got = binary_scores(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # tp 2, fp 1, fn 1, tn 1
    assert got == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "F1": 2 / 3, "yes_ratio": 0.6, "questions": 5}
    )


def test_option_letter_and_all_right_groups():
    from unimm.benchmarks.scoring import group_all_right, option_letter

    options = ["dog", "cat", "bird", "fish"]
    for reply, want in [
        ("B", "B"), ("(C)", "C"), ("D.", "D"), ("B. cat", "B"), ("A) dog", "A"),
        ("The answer is C.", "C"), ("Cat", "B"), ("cat.", "B"), ("E", None), ("", None), ("a dog", None),
    ]:  # fmt: skip
        assert option_letter(reply, options) == want, reply
    assert option_letter("dog", ["dog", "Dog"]) is None  # the text of two options names none
    assert group_all_right([True, True, True, False, False], ["a", "a", "b", "b", "c"]) == (1 / 3, 3)


# ---------------------------------------------------------------------------------------------
# Miniature releases


def vqav2(root: Path, answers: dict[int, list[str]] | None = None) -> Path:
    """Val questions and annotations (three questions about two images) and test-dev questions."""
    questions, annotations = [], []
    for qid, image_id in ((11, 1), (12, 1), (21, 2)):
        make_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", colour=COLOURS[image_id])
        questions.append(
            {"image_id": image_id, "question": f"What colour is thing {qid}?", "question_id": qid}
        )
        ten = (answers or {}).get(qid, [WORDS[image_id]] * 9 + ["dunno"])
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answer_type": "other" if qid != 12 else "yes/no",
                "question_type": "what color",
                "multiple_choice_answer": ten[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(ten)
                ],
            }
        )
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    make_image(root / "test2015" / "COCO_test2015_000000000007.jpg")
    test = [{"image_id": 7, "question": "How many?", "question_id": 70}]
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({"questions": test}))
    return root


def test_vqav2_replies_are_the_models_and_graded_by_the_vqa_rule(trained, tmp_path):
    from unimm.benchmarks.scoring import normalize_vqa_answer, vqa_accuracy
    from unimm.data.adapters import open_image
    from unimm.data.samples import Sample, Slice
    from unimm.inference.session import Session

    checkpoint, _ = trained
    root = vqav2(tmp_path / "vqa")
    output, results = eval_benchmark("vqav2", root, checkpoint, tmp_path / "a.json", "--split", "val")
    replies = {r["id"]: r["reply"] for r in results["per_query"]["vqav2"]}
    session = Session.load(checkpoint, device="cpu")
    image = root / "val2014" / "COCO_val2014_000000000001.jpg"
    prompt = [Slice.of_image(open_image(image)), Slice.of_text(
        "What colour is thing 11?\nAnswer the question using a single word or phrase."
    )]  # fmt: skip
    (own,) = session.generate([Sample.of_slices(prompt)], max_new_tokens=16)
    assert replies["11"] == own.split("\n")[0].strip()
    # graded again: question 11's annotators now said the model's reply three times of ten
    # and question 21's all gave it (as the release writes answers: already normalised)
    ten = [normalize_vqa_answer(replies["21"])] * 10
    root2 = vqav2(tmp_path / "vqa2", {11: [replies["11"]] * 3 + ["zzz"] * 7, 21: ten})
    _, again = eval_benchmark("vqav2", root2, checkpoint, tmp_path / "b.json", "--split", "val")
    metrics = again["metrics"]["vqav2"]
    want = [vqa_accuracy(replies["11"], [replies["11"]] * 3 + ["zzz"] * 7), 0.0, 1.0]
    if replies["12"].strip().lower() == WORDS[1]:
        want[1] = 1.0
    assert want[0] == pytest.approx(0.9) and metrics["accuracy"] == pytest.approx(sum(want) / 3)
    assert metrics["by_answer_type"]["yes/no"]["questions"] == 1
    assert "vqav2" in output and "accuracy" in output
    # test-dev: no answers released; the replies go to a submission file in the server's format
    _, test = eval_benchmark("vqav2", root, checkpoint, tmp_path / "t.json")
    assert test["metrics"]["vqav2"] == {"questions": 1, "scored": False}
    submission = json.loads((tmp_path / "t.vqav2.submission.json").read_text())
    assert submission == [{"question_id": 70, "answer": test["per_query"]["vqav2"][0]["read"]}]
    assert any("submission" in n for n in test["notes"])


def test_vizwiz_textvqa_gqa_layouts(tmp_path):
    (tmp_path / "vz" / "Annotations").mkdir(parents=True)
    make_image(tmp_path / "vz" / "val" / "VizWiz_val_00000000.jpg")
    make_image(tmp_path / "vz" / "test" / "VizWiz_test_00000000.jpg")
    ten = [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10
    val = [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 0,
         "answer_type": "unanswerable", "answers": ten},
    ]  # fmt: skip
    (tmp_path / "vz" / "Annotations" / "val.json").write_text(json.dumps(val))
    (tmp_path / "vz" / "Annotations" / "test.json").write_text(
        json.dumps([{"image": "VizWiz_test_00000000.jpg", "question": "Which can?"}])
    )
    data = load("vizwiz", tmp_path / "vz", split="val")
    (task,) = data.tasks
    assert task.references == [["unanswerable"] * 10] and task.groups == {"answer_type": ["unanswerable"]}
    assert "respond with 'Unanswerable'" in task.prompts[0].parts[1][1]
    test = load("vizwiz", tmp_path / "vz").tasks[0]
    assert test.submission == {"id": "image", "answer": "answer"} and test.references == [[]]

    make_image(tmp_path / "tv" / "train_images" / "abc123.jpg")
    doc = {
        "data": [
            {"question_id": 5, "image_id": "abc123", "question": "What brand?", "answers": ["nike"] * 10}
        ]
    }
    (tmp_path / "tv" / "TextVQA_0.5.1_val.json").write_text(json.dumps(doc))
    (task,) = load("textvqa", tmp_path / "tv", split="val").tasks
    assert task.grading == "vqa" and task.prompts[0].parts[0][1].endswith("train_images/abc123.jpg")

    make_image(tmp_path / "gqa" / "images" / "n123.jpg")
    types = {"structural": "verify", "semantic": "attr"}
    doc = {"201": {"imageId": "n123", "question": "Is it red?", "answer": "yes", "types": types}}
    (tmp_path / "gqa" / "questions").mkdir(parents=True)
    (tmp_path / "gqa" / "questions" / "testdev_balanced_questions.json").write_text(json.dumps(doc))
    (task,) = load("gqa", tmp_path / "gqa").tasks
    assert task.grading == "exact" and task.groups["structural"] == ["verify"]
    from unimm.benchmarks.answering import grade

    assert grade(task, 0, "Yes.") == ("yes", 1.0) and grade(task, 0, "no") == ("no", 0.0)


def test_vqa_layout_errors(tmp_path):
    root = vqav2(tmp_path)
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").unlink()
    with pytest.raises(
        UnimmError,
        match=r"\(the test split\), but v2_OpenEnded_mscoco_val2014_questions.json: use --split val",
    ):
        load("vqav2", root)
    doc = json.loads((root / "v2_mscoco_val2014_annotations.json").read_text())
    doc["annotations"] = doc["annotations"][:2]
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(doc))
    with pytest.raises(UnimmError, match="question_id 21 has no annotation"):
        load("vqav2", root, split="val")
    (root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(UnimmError, match="question_id 21"):
        load("vqav2", root, split="val")
    with pytest.raises(UnimmError, match=r"expected v2_OpenEnded_mscoco_val2014_questions.json"):
        load("vqav2", tmp_path / "val2014", split="val")
    with pytest.raises(UnimmError, match=r"no 'train' split"):
        load("vqav2", root, split="train")


def pope(root: Path) -> Path:
    for kind, labels in (("adversarial", "yes no no"), ("random", "no yes yes")):
        lines = []
        for n, label in enumerate(labels.split()):
            image = f"COCO_val2014_{n:012d}.jpg"
            make_image(root / "val2014" / image, colour=COLOURS[n])
            text = f"Is there a {WORDS[n]} ball in the image?"
            lines.append(json.dumps({"question_id": n + 1, "image": image, "text": text, "label": label}))
        (root / f"coco_pope_{kind}.json").write_text("\n".join(lines) + "\n")
    return root


def test_pope_scores_are_the_replies_read_by_popes_rule(trained, tmp_path):
    from unimm.benchmarks.scoring import binary_scores, yes_no

    checkpoint, _ = trained
    _, results = eval_benchmark("pope", pope(tmp_path / "pope"), checkpoint, tmp_path / "p.json")
    labels = {"adversarial": ["yes", "no", "no"], "random": ["no", "yes", "yes"]}
    for kind, want in labels.items():
        read = [yes_no(r["reply"]) for r in results["per_query"][kind]]
        assert [r["read"] for r in results["per_query"][kind]] == read
        expected = binary_scores(read, want)
        got = results["metrics"][kind]
        assert {k: got[k] for k in expected} == pytest.approx(expected)
    f1 = [results["metrics"][k]["F1"] for k in labels]
    assert results["metrics"]["averages"]["F1"]["F1"] == pytest.approx(sum(f1) / 2)


def test_pope_and_mme_bad_input(tmp_path):
    root = pope(tmp_path / "pope")
    with open(root / "coco_pope_random.json", "a") as f:
        row = {"question_id": 9, "image": "COCO_val2014_000000000000.jpg", "text": "?", "label": "maybe"}
        f.write(json.dumps(row) + "\n")
    with pytest.raises(UnimmError, match=r"coco_pope_random.json:4: label 'maybe' should be yes or no"):
        load("pope", root)
    mme_root = mme(tmp_path / "mme")
    (mme_root / "existence" / "0002.txt").write_text("Is there a cat? Yes\n")
    with pytest.raises(UnimmError, match=r"existence/0002.txt:1: expected 'question<TAB>Yes'"):
        load("mme", mme_root)
    with pytest.raises(UnimmError, match="not the mme benchmark"):
        load("mme", root)


def mme(root: Path) -> Path:
    """Two subtasks: existence (images and questions side by side), artwork (two subfolders)."""
    base = root / "MME_Benchmark_release_version"
    for n in range(2):
        make_image(base / "existence" / f"000{n + 1}.jpg", colour=COLOURS[n])
        (base / "existence" / f"000{n + 1}.txt").write_text(
            f"Is there a {WORDS[n]} thing in this image? Please answer yes or no.\tYes\n"
            f"Is there a {WORDS[n + 2]} thing in this image? Please answer yes or no.\tNo\n"
        )
        make_image(base / "artwork" / "images" / f"10{n}.png", colour=COLOURS[n + 2], fmt="PNG")
        (base / "artwork" / "questions_answers_YN").mkdir(parents=True, exist_ok=True)
        (base / "artwork" / "questions_answers_YN" / f"10{n}.txt").write_text(
            "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
            "Is this artwork created by Turner? Please answer yes or no.\tYes\n"
        )
    return base


def test_mme_acc_plus_and_totals(trained, tmp_path):
    from unimm.benchmarks.scoring import yes_no

    checkpoint, _ = trained
    _, results = eval_benchmark("mme", mme(tmp_path / "mme").parent, checkpoint, tmp_path / "m.json")
    for subtask in ("existence", "artwork"):
        rows = results["per_query"][subtask]
        assert len(rows) == 4
        right = [yes_no(r["reply"], "mme") == r["references"][0] for r in rows]
        acc, acc_plus = sum(right) / 4, ((right[0] and right[1]) + (right[2] and right[3])) / 2
        got = results["metrics"][subtask]
        assert (got["accuracy"], got["acc+"]) == pytest.approx((acc, acc_plus))
        assert got["score"] == pytest.approx(100 * (acc + acc_plus))
    totals = results["metrics"]["totals"]
    assert totals["perception"]["score"] == pytest.approx(
        results["metrics"]["existence"]["score"] + results["metrics"]["artwork"]["score"]
    )
    assert totals["perception"]["tasks"] == 2 and "cognition" not in totals
    assert any("missing" in n for n in results["notes"])


def _b64(colour) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def mmbench(root: Path, answers: bool = True) -> Path:
    """A dev TSV: a 4-option question, a 3-option one (D empty) whose image cell names row 1's."""
    root.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["1", "What colour is it?", "A picture.", "red", "green", "blue", "yellow", "B", "attribute",
         _b64(COLOURS[1])],
        ["2", "How many things?", "nan", "one", "two", "three", "nan", "C", "count", "1"],
    ]  # fmt: skip
    if not answers:
        header.remove("answer")
        rows = [r[:7] + r[8:] for r in rows]
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    name = "MMBench_DEV_EN.tsv" if answers else "MMBench_TEST_EN.tsv"
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_mmbench_circular_evaluation_by_generation_and_likelihood(trained, tmp_path):
    from unimm.benchmarks.scoring import option_letter

    data = load("mmbench", mmbench(tmp_path / "mmb"), split="val")
    gen, lik = data.tasks
    assert len(gen.ids) == 4 + 3 and gen.together == ["1"] * 4 + ["2"] * 3
    for q in range(7):  # each rotation's right letter still names the right option's text
        original = {"1": "green", "2": "three"}[gen.together[q]]
        assert gen.options[q][ord(gen.references[q][0]) - ord("A")] == original
        assert lik.answers[q] == ord(gen.references[q][0]) - ord("A")
    assert gen.prompts[1].parts[1][1].startswith("A picture.\nWhat colour is it?\nA. green\nB. blue")
    assert gen.prompts[4].parts[0] == gen.prompts[0].parts[0]  # row 2's image is row 1's
    checkpoint, _ = trained
    _, results = eval_benchmark(
        "mmbench", tmp_path / "mmb", checkpoint, tmp_path / "r.json", "--split", "val"
    )
    for name, task in (("mmbench:generation", gen), ("mmbench:likelihood", lik)):
        rows = results["per_query"][name]
        if name.endswith("generation"):
            right = [
                option_letter(r["reply"], task.options[q]) == task.references[q][0]
                for q, r in enumerate(rows)
            ]
        else:
            right = [r["correct"] for r in rows]
        circular = (all(right[:4]) + all(right[4:])) / 2
        assert results["metrics"][name]["circular_accuracy"] == pytest.approx(circular)
        assert results["metrics"][name]["accuracy"] == pytest.approx(sum(right) / 7)
    # the test TSV: no answers, replies kept, no figures
    data = load("mmbench", mmbench(tmp_path / "mmt", answers=False))
    assert [t.name for t in data.tasks] == ["mmbench:generation"] and data.tasks[0].references[0] == []


def test_scienceqa_img_subset_and_prompts(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["cat", "fish"], "answer": 0, "hint": "Look.",
              "image": "image.png", "split": "test", "subject": "natural science", "grade": "grade3"},
        "2": {"question": "Which word rhymes?", "choices": ["a", "b", "c"], "answer": 2, "hint": "",
              "image": None, "split": "test", "subject": "language science", "grade": "grade2"},
        "3": {"question": "Which map?", "choices": ["x", "y", "z"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test", "subject": "social science", "grade": "grade5"},
    }  # fmt: skip
    root = tmp_path / "sqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "val": []}))
    make_image(root / "images" / "test" / "1" / "image.png", fmt="PNG")
    make_image(root / "images" / "test" / "3" / "image.png", fmt="PNG")
    data = load("scienceqa-img", root)
    gen, lik = data.tasks
    assert gen.ids == ["1", "3"] and gen.references == [["A"], ["B"]] and lik.answers == [0, 1]
    assert gen.prompts[0].parts[1][1] == (
        "Context: Look.\nWhich is a mammal?\nA. cat\nB. fish\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert gen.prompts[1].parts[1][1].startswith("Which map?\nA. x")  # no context line without a hint
    assert "IMG: 2 of the 3 test problems" in data.notes[0]
    problems["3"]["answer"] = 5
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(UnimmError, match="problem 3: answer 5 is not one of its 3 choices"):
        load("scienceqa-img", root)


# ---------------------------------------------------------------------------------------------
# Retrieval-augmented evaluation


def test_rag_retrieves_with_the_same_model_and_answers_with_chats_template(trained, tmp_path):
    import torch

    from unimm.data.adapters import open_image
    from unimm.data.samples import Slice
    from unimm.inference.chat import build_prompt
    from unimm.inference.documents import load_document
    from unimm.inference.session import Session
    from unimm.inference.store import load_rows, read_manifest

    checkpoint, index = trained
    root = vqav2(tmp_path / "vqa")
    args = ("--split", "val", "--rag", str(index), "--rag-k", "2")
    _, results = eval_benchmark("vqav2", root, checkpoint, tmp_path / "r.json", *args)
    assert results["rag"]["k"] == 2 and results["rag"]["documents"] == 24
    # the oracle: embed the question and every document afresh, rank by brute force, build the
    # prompt with chat's template, generate
    session = Session.load(checkpoint, device="cpu")
    manifest = read_manifest(index)
    rows = load_rows(index, manifest)
    image = root / "val2014" / "COCO_val2014_000000000001.jpg"
    question = [
        Slice.of_image(open_image(image)),
        Slice.of_text("What colour is thing 11?\nAnswer the question using a single word or phrase."),
    ]
    query = session.embed_views([build_prompt(question, [], [])])[0]
    documents = [load_document(r, manifest["data"]) for r in rows]
    doc_vectors = session.embed_views(documents)
    scores = doc_vectors @ query
    top = torch.argsort(scores, descending=True)[:2].tolist()
    got = results["per_query"]["vqav2"][0]
    assert [h[0] for h in got["retrieved"]] == [rows[r]["id"] for r in top]
    assert [h[1] for h in got["retrieved"]] == pytest.approx([float(scores[r]) for r in top], abs=1e-4)
    (own,) = session.generate([build_prompt(question, [documents[r] for r in top], [])], max_new_tokens=16)
    assert got["reply"] == own.split("\n")[0].strip()


def test_rag_bad_input(trained, tmp_path):
    from tests.test_benchmarks import invoke, karpathy

    checkpoint, index = trained
    karpathy(tmp_path / "coco", "coco")
    args = [
        "--data",
        str(tmp_path / "coco"),
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--rag",
        str(index),
    ]
    result = invoke("eval", "--benchmark", "coco", *args)
    assert result.exit_code != 0 and "applies to the generative benchmarks" in result.output
    result = invoke("eval", "--benchmark", "vqav2", *args[:2], *args[2:-1], str(tmp_path))
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = invoke("eval", "--data", str(tmp_path), "--model", str(checkpoint), "--rag", str(index))
    assert result.exit_code != 0 and "needs --benchmark" in result.output


# ---------------------------------------------------------------------------------------------
# Judged benchmarks (LLaVA-W, MM-Vet)


def test_judge_readings_and_figures_by_hand():
    from unimm.benchmarks.base import AnswerTask, Item
    from unimm.benchmarks.judged import correctness, judged_metrics, score_pair

    assert score_pair("8 7\nAssistant 1 is more detailed.") == (8.0, 7.0)
    assert score_pair("8, 6.5") == (8.0, 6.5)
    assert score_pair("Assistant 1: 8\n") is None and score_pair("8 7 6") is None and score_pair("") is None
    assert correctness(" 0.7 ") == 0.7 and correctness("1.3") is None and correctness("0.7 (partly)") is None
    items = [Item.text(str(q), "?") for q in range(3)]
    task = AnswerTask(
        "llava-w", ["0", "1", "2"], items, [["r"]] * 3, "llava-w", {"category": ["conv", "conv", "detail"]}
    )
    got = judged_metrics(task, [{"scores": (8.0, 6.0)}, {"scores": None}, {"scores": (5.0, 5.0)}])
    assert got["relative_score"] == pytest.approx(100 * 11 / 13) and got["judge_failures"] == 1
    assert got["by_category"]["conv"]["relative_score"] == pytest.approx(75.0)
    task = AnswerTask("mm-vet", ["0", "1"], items[:2], [["a"]] * 2, "mm-vet", extras=[
        {"capability": ["rec", "ocr"]}, {"capability": ["rec"]}
    ])  # fmt: skip
    got = judged_metrics(task, [{"score": 0.5}, {"score": None}])
    assert got["score"] == pytest.approx(25.0) and got["judge_failures"] == 1
    assert got["by_capability"] == {
        "ocr": {"score": 50.0, "questions": 1},
        "rec": {"score": 25.0, "questions": 2},
    }


def llava_w(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_image(root / "images" / "001.jpg", colour=COLOURS[0])
    make_image(root / "images" / "002.jpg", colour=COLOURS[1])
    questions = [
        {"question_id": 0, "image": "001.jpg", "text": "What is in the picture?", "category": "conv"},
        {"question_id": 1, "image": "002.jpg", "text": "Describe the image in detail.", "category": "detail"},
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "context.jsonl").write_text(
        "".join(
            json.dumps({"image": f"00{n}.jpg", "caption": f"A {WORDS[n - 1]} square."}) + "\n" for n in (1, 2)
        )
    )
    (root / "answers_gpt4.jsonl").write_text(
        "".join(json.dumps({"question_id": n, "text": f"A {WORDS[n]} square."}) + "\n" for n in (0, 1))
    )
    return root


def test_llava_w_with_unimm_serve_as_the_judge(trained, tmp_path):
    pytest.importorskip("fastapi")
    from unimm.benchmarks.judged import Judge, llava_w_messages, score_pair
    from unimm.config import ServeOptions
    from unimm.inference.serving import Background, build_state

    checkpoint, _ = trained
    root = llava_w(tmp_path / "lw")
    missing = invoke_eval("llava-w", root, checkpoint, tmp_path / "x.json")
    assert missing.exit_code != 0 and "give --judge URL" in missing.output
    state = build_state(ServeOptions(model=str(checkpoint), name="judge"))
    with Background(state) as url:
        args = ("--judge", url, "--judge-model", "judge", "--set", "eval.batch_size=1")
        _, results = eval_benchmark("llava-w", root, checkpoint, tmp_path / "w.json", *args)
        rows = results["per_query"]["llava-w"]
        # the judge's reviews are what the server answers to the same conversation
        again = Judge(url, "judge")
        for q, row in enumerate(rows):
            caption = f"A {WORDS[q]} square."
            question = ["What is in the picture?", "Describe the image in detail."][q]
            messages = llava_w_messages(caption, question, f"A {WORDS[q]} square.", row["reply"])
            assert row["judge"] == again.ask(messages, max_tokens=1024)
            assert row["scores"] == (list(score_pair(row["judge"])) if score_pair(row["judge"]) else None)
    metrics = results["metrics"]["llava-w"]
    failures = sum(row["scores"] is None for row in rows)
    assert metrics["judge_failures"] == failures and metrics["questions"] == 2
    assert results["settings"]["judge_calls"] == 2 and results["settings"]["judge_model"] == "judge"
    unreachable = invoke_eval(
        "llava-w", root, checkpoint, tmp_path / "y.json", "--judge", "http://127.0.0.1:9"
    )
    assert unreachable.exit_code != 0 and "cannot reach it" in unreachable.output


def invoke_eval(name: str, data: Path, checkpoint: Path, out: Path, *extra: str):
    from tests.test_benchmarks import invoke

    args = ["--benchmark", name, "--data", str(data), "--model", str(checkpoint), "--out", str(out)]
    return invoke("eval", *args, "--device", "cpu", *extra)


def test_vqa_quirks_unknown_answer_type_and_limit(tmp_path):
    root = vqav2(tmp_path)
    doc = json.loads((root / "v2_mscoco_val2014_annotations.json").read_text())
    del doc["annotations"][0]["answer_type"]
    doc["annotations"][1]["answer_type"] = "colour"  # not one of VQAv2's three: its own group
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(doc))
    (task,) = load("vqav2", root, split="val").tasks
    assert task.groups["answer_type"] == ["unknown", "colour", "other"]
    data = load("vqav2", root, split="val", limit=2)
    assert data.tasks[0].ids == ["11", "12"] and any("--limit 2" in n for n in data.notes)
    doc["annotations"][2]["answers"] = [{"answer": 3}] * 10
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(doc))
    with pytest.raises(UnimmError, match="question_id 21: an answer is int, not text"):
        load("vqav2", root, split="val")
