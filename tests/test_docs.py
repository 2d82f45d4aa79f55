"""The docs stay true: docs/api.md is what `python -m embedq.tools.apidoc` generates
from the .proto comments now, local links resolve, and the Redis key names in
docs/architecture.md are the ones keys.py builds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from embedq.tools import apidoc

from embedq.keys import Keys

ROOT = Path(apidoc.REPO_ROOT)
DOCS = ROOT / "docs"
# Pages whose relative links must resolve (others' pages check themselves).
LINKED_PAGES = [
    "README.md",
    "docs/api.md",
    "docs/architecture.md",
    "docs/clients.md",
    "docs/deployment.md",
    "docs/troubleshooting.md",
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_api_reference_is_fresh() -> None:
    fresh = apidoc.render()
    checked_in = (DOCS / "api.md").read_text(encoding="utf-8")
    assert checked_in == fresh, (
        "docs/api.md is stale: run `python -m embedq.tools.apidoc` and commit"
    )


def test_api_reference_covers_every_rpc_message_and_enum() -> None:
    from embedq.v1 import embedq_pb2

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    file = embedq_pb2.DESCRIPTOR
    names = [m.full_name for m in file.services_by_name["Embedder"].methods]
    names += [m.full_name for m in file.message_types_by_name.values()]
    names += [e.full_name for e in file.enum_types_by_name.values()]
    for name in names:
        assert f'<a name="{name}"></a>' in text, f"{name} missing from docs/api.md"


def test_apidoc_check_mode(tmp_path: Path) -> None:
    out = tmp_path / "api.md"
    assert apidoc.main(["--out", str(out), "--check"]) == 1
    assert apidoc.main(["--out", str(out)]) == 0
    assert apidoc.main(["--out", str(out), "--check"]) == 0


def markdown(path: Path) -> str:
    """A page without its fenced code blocks (not Markdown: no links or headings there)."""
    return re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a page, plus its explicit <a name> anchors."""
    text = markdown(path)
    found = set(re.findall(r'<a name="([^"]+)"></a>', text))
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    for target in LINK.findall(markdown(path)):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        assert linked.exists(), f"{page}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page}: no anchor #{anchor} in {linked.name}"


def test_architecture_names_the_real_keys() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    keys = Keys("<ns>")
    expected = [
        keys.models(),
        keys.jobs("<model>"),
        keys.dead_letters("<model>"),
        keys.workers("<model>"),
        keys.replies("<server-id>"),
        Keys.cancelled(keys.replies("<server-id>")),
        keys.cache("<variant>", "<sha256-hex>"),
    ]
    for key in expected:
        assert f"`{key}`" in text, f"docs/architecture.md does not show the key {key}"


def test_clients_cache_key_vector_is_right() -> None:
    """docs/clients.md gives a worked cache key for checking ports of the hash rule."""
    from embedq.keys import text_sha256, variant_fingerprint

    text = (DOCS / "clients.md").read_text(encoding="utf-8")
    variant = variant_fingerprint("abc", normalize=True, truncate=True)
    key = Keys("embedq").cache(variant, text_sha256("héllo wörld"))
    assert f"`{key}`" in text
