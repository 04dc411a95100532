"""The HTML inspector: counts match the trainer's selection, dataset text is escaped, nothing runs."""

from html.parser import HTMLParser

import torch
from datasets import Dataset

from conftest import build_model, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, select_sdpo_tokens
from selective_po.cli import main
from selective_po.inspector import collect_pair_views, render_html

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
]


class TagCounter(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.kept, self.counts = [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok kept":
            self.kept += 1
        if "data-kept" in attrs:
            self.counts.append(int(attrs["data-kept"]))


def hostile_dataset():
    rows = preference_dataset().to_list()[:3]
    rows[0]["prompt"][0]["content"] = HOSTILE[0]
    rows[1]["chosen"][0]["content"] = "Fine. " + HOSTILE[1]
    rows[2]["rejected"][0]["content"] = HOSTILE[0] + " " + HOSTILE[1]
    return Dataset.from_list(rows)


def make_trainer(tmp_path, tokenizer, dataset):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none", max_length=128)
    return SelectiveDPOTrainer(
        model=build_model(tokenizer, seed=1), ref_model=build_model(tokenizer, seed=2), args=args,
        train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip


def test_page_shows_the_trainers_selection_and_escapes_dataset_text(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, hostile_dataset())
    views = collect_pair_views(trainer, threshold=0.6)
    page = render_html(views, title="test <b>", threshold=0.6)

    parser = TagCounter()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags  # shown as text, never as markup
    assert "&lt;script&gt;" in page
    assert "onerror" not in page.replace("onerror=alert(1)&gt;", "")  # only inside escaped text

    # kept counts equal the trainer's own selection on the same batch
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(3)])
    with torch.no_grad():
        _, policy, ref, mask = trainer.per_token_logps(trainer.model, batch)
    *_, keep_c, keep_r = select_sdpo_tokens(
        *policy.chunk(2), *ref.chunk(2), chosen_mask=mask.chunk(2)[0], rejected_mask=mask.chunk(2)[1], threshold=0.6
    )
    expected = [int(keep_c[i].sum()) for i in range(3)], [int(keep_r[i].sum()) for i in range(3)]
    assert parser.counts == [n for pair in zip(*expected) for n in pair]
    assert parser.kept == int(keep_c.sum() + keep_r.sum())


def test_inspect_command_writes_a_page(tmp_path, tiny_model_dir):
    out = tmp_path / "page" / "inspect.html"
    assert main(["inspect", "--model", tiny_model_dir, "--ref_model", tiny_model_dir, "--pairs", "3", "--output", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('class="pair"') == 3
    assert not list(out.parent.glob(".*partial"))


def chromium_or_skip() -> str:
    """Debian's chromium: found, else installed with apt-get (as root), else a skip saying why."""
    import os
    import shutil
    import subprocess

    import pytest

    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # stale package lists on a fresh machine: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0 or shutil.which("chromium") is None:
        pytest.skip(f"installing chromium with apt-get failed: {result.stderr.strip()[-500:]}")
    return shutil.which("chromium")


def test_page_in_a_real_headless_browser(tmp_path, tiny_tokenizer):
    """Loads with no console message; the rendered DOM has the kept tokens and no injected elements."""
    import subprocess

    browser = chromium_or_skip()
    rows = hostile_dataset().to_list()
    # payloads that would print to the console if they ever ran
    rows[0]["prompt"][0]["content"] = '<script>console.error("XSS-PROBE")</script>'
    rows[1]["chosen"][0]["content"] = "ok \"><img src=x onerror=console.error('XSS-PROBE')>"
    trainer = make_trainer(tmp_path, tiny_tokenizer, Dataset.from_list(rows))
    views = collect_pair_views(trainer, threshold=0.6)
    page = tmp_path / "page.html"
    page.write_text(render_html(views, title="browser test", threshold=0.6), encoding="utf-8")

    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--dump-dom",
    ]  # fmt: skip
    result = subprocess.run([browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ":CONSOLE" not in result.stderr, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    dom = TagCounter()
    dom.feed(result.stdout)
    assert "script" not in dom.tags and "img" not in dom.tags
    assert dom.kept == sum(t.kept for view in views for t in view.chosen + view.rejected) > 0
    assert "XSS-PROBE" in result.stdout  # the payloads are on the page, as text


def test_inspect_shows_a_scorers_fixed_scores_whatever_the_policy(tmp_path, tiny_model_dir, ref_dir):
    """`--selection_rule scorer`: the kept tokens are the trainer's fixed-score selection, the same for any --model."""
    pages = []
    for policy in (tiny_model_dir, ref_dir):
        out = tmp_path / f"{len(pages)}.html"
        command = ["inspect", "--model", policy, "--ref_model", tiny_model_dir, "--selection_rule", "scorer", "--scorer", ref_dir]
        assert main([*command, "--pairs", "3", "--output", str(out)]) == 0
        parser = TagCounter()
        parser.feed(out.read_text())
        pages.append((parser.counts, parser.kept))
    assert pages[0] == pages[1] and 0 < pages[0][1]
    # the same counts as the trainer's own selection
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "t"), report_to="none", selection_rule="scorer", sdpo_threshold=0.6,
                              scorer_model_name_or_path=ref_dir, precompute_ref_log_probs=True)  # fmt: skip
    from selective_po.cli import load_preference_split

    rows = load_preference_split("arithmetic", None)[0].select(range(3))  # what the command showed
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=rows, eval_dataset=rows)
    views = collect_pair_views(trainer, threshold=0.6, rule="scorer")
    assert pages[0][0] == [sum(t.kept for t in side) for view in views for side in (view.chosen, view.rejected)]


def test_inspect_scorer_rule_and_scorer_come_together(tmp_path, tiny_model_dir):
    import pytest

    for extra in (["--selection_rule", "scorer"], ["--scorer", tiny_model_dir]):
        with pytest.raises(SystemExit):
            main(["inspect", "--model", tiny_model_dir, "--output", str(tmp_path / "x.html"), *extra])
