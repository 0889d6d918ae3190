"""The docs hold together: every relative link and anchor resolves, the job reference names
every field of the job, and the README stays a short front page. Pure: reads files only."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from urllib.parse import unquote

from pydantic import BaseModel

from finetune_worker.contract import errors, job, settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
JOB_REFERENCE = DOCS / "job-reference.md"
OPERATING = DOCS / "operating.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [README, ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif match.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, every character that is
    not a letter, digit, space, hyphen or underscore dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a Markdown file give, duplicates numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link outside code (fenced blocks and code spans)."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("`code`", line)
        found += [(number, match.group(2)) for match in LINK.finditer(line)]
    return found


def relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)  # http:, https:, mailto:, ...


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(path):
        if not relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(root)}:{number}: {target}"
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {destination.relative_to(root)}")
    return problems


def test_slugs_follow_github():
    assert slug("Ask the fine-tune: `mode: generate`") == "ask-the-fine-tune-mode-generate"
    assert slug("Endpoint defaults (AXOLOTL_* variables)") == "endpoint-defaults-axolotl_-variables"
    assert slug("The operator's credentials on a shared endpoint") == "the-operators-credentials-on-a-shared-endpoint"
    assert slug("W&B and TensorBoard") == "wb-and-tensorboard"


def test_every_relative_link_and_anchor_resolves():
    problems = [problem for path in markdown_files() for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_the_link_check_catches_a_broken_anchor_and_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page.write_text(
        "# Page\n\n[ok](#page) [ok](other.md#twice-1) [bad](#nowhere) [bad](other.md#twice-2) [gone](gone.md)\n"
        "[web](https://example.com/#x) `[code](#nowhere)`\n\n```\n[fenced](#nowhere)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 3, problems
    assert "#nowhere" in problems[0] and "#twice-2" in problems[1] and "no such file" in problems[2]


def job_models(model: type[BaseModel] = job.JobInput) -> dict[type[BaseModel], None]:
    """The job's model and every model nested in its fields' annotations, in order."""
    found: dict[type[BaseModel], None] = {model: None}
    stack = [field.annotation for field in model.model_fields.values()]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.update(job_models(annotation))
        else:
            stack.extend(typing.get_args(annotation))
    return found


def test_the_job_reference_names_every_field_of_the_job():
    models = job_models()
    nested = {job.Credentials, job.PublishOptions, job.EvaluationOptions, job.EvaluationDataset, job.ContinueFrom, job.ChatMessage}
    assert nested <= set(models)
    reference = JOB_REFERENCE.read_text(encoding="utf-8")
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        # `name`, or a dotted path ending in it: `credentials.hf_token`, `dataset.path`
        if not re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}`", reference)
    ]
    assert not missing, f"not documented as `name` in {JOB_REFERENCE.relative_to(ROOT)}: {missing}"


def test_the_readme_is_short_and_links_to_every_doc():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES, "keep the README to a front page; move the rest to docs/"
    targets = {target.partition("#")[0] for _, target in links(README)}
    missing = [f"docs/{doc.name}" for doc in sorted(DOCS.glob("*.md")) if f"docs/{doc.name}" not in targets]
    assert not missing, f"the README links to none of {missing}"


def test_every_error_code_has_a_row_in_the_job_reference_and_every_setting_is_in_operating():
    reference, operating = JOB_REFERENCE.read_text(encoding="utf-8"), OPERATING.read_text(encoding="utf-8")
    codes = [value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)]
    assert len(codes) >= 17
    assert [code for code in codes if f"| `{code}` |" not in reference] == [], "add a row to the error-code table"
    missing = [name for name in settings.ENV_NAMES.values() if f"`{name}`" not in operating]
    assert not missing, f"document these worker settings in {OPERATING.relative_to(ROOT)}: {missing}"
