"""The SWORD zText reader and the OSIS stripper against Debian's sword-text-kjv (``tools/kjv.py``).

The reader tests need the package (CI: ``apt-get install -y sword-text-kjv``) and fail, saying so, when it is
not installed (``tests/requires.py``); the stripper tests need nothing.
"""

from __future__ import annotations

import shutil
import struct

import pytest

from tests.requires import require_kjv
from tools import kjv

pytestmark = pytest.mark.timeout(60)
needs_kjv = pytest.mark.usefixtures("kjv_installed")


@pytest.fixture
def kjv_installed() -> None:
    require_kjv()  # without the package these tests fail, saying what to install (never skip)


@pytest.fixture(scope="module")
def verses():
    return kjv.read_verses()


@pytest.fixture(scope="module")
def by_ref(verses):
    return {v.ref: v.text for v in verses}


def test_versification_table():
    assert len(kjv.BOOKS) == 66 and kjv.OT_BOOKS == 39
    assert sum(b.chapters for b in kjv.BOOKS) == 1189
    assert sum(sum(b.verses) for b in kjv.BOOKS) == 31102
    assert sum(sum(b.verses) for b in kjv.BOOKS[: kjv.OT_BOOKS]) == 23145
    ps = kjv.BOOK_BY_OSIS["Ps"]
    assert ps.chapters == 150 and ps.verses[118] == 176 and ps.verses[116] == 2


@needs_kjv
def test_count_and_order(verses):
    assert len(verses) == 31102
    assert verses[0].ref == "Genesis 1:1"
    assert verses[-1].ref == "Revelation 22:21"
    assert all(v.text for v in verses)


@needs_kjv
@pytest.mark.parametrize("ref, text", [
    ("Genesis 1:1", "In the beginning God created the heaven and the earth."),
    ("John 11:35", "Jesus wept."),
    ("Revelation 22:21", "The grace of our Lord Jesus Christ be with you all. Amen."),
    ("Malachi 4:6", "And he shall turn the heart of the fathers to the children, and the heart of the children to "
                    "their fathers, lest I come and smite the earth with a curse."),
    ("Matthew 1:1", "The book of the generation of Jesus Christ, the son of David, the son of Abraham."),
    ("Psalms 23:1", "The LORD is my shepherd; I shall not want."),
    ("Psalms 119:176", "I have gone astray like a lost sheep; seek thy servant; for I do not forget thy "
                       "commandments."),
    ("3 John 1:14", "But I trust I shall shortly see thee, and we shall speak face to face. Peace be to thee. "
                    "Our friends salute thee. Greet the friends by name."),
    ("Exodus 6:3", "And I appeared unto Abraham, unto Isaac, and unto Jacob, by the name of God Almighty, but by "
                   "my name JEHOVAH was I not known to them."),  # a stray USFM \nd marker in the module
])
def test_known_verses(by_ref, ref, text):
    assert by_ref[ref] == text


@needs_kjv
def test_plain_text_only(verses):
    bad = [v.ref for v in verses if any(c in v.text for c in "<>&\\\u00b6") or "  " in v.text]
    assert bad == []


@needs_kjv
def test_psalm_titles_are_not_verse_text(by_ref):
    assert by_ref["Psalms 3:1"].startswith("LORD, how are they increased")
    assert "A Psalm of David" not in by_ref["Psalms 3:1"]


@needs_kjv
def test_every_chapter_heading_slot_matches(tmp_path):
    """Removing one verse slot shifts the mapping; the reader must refuse rather than mislabel."""
    for f in kjv.MODULE_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bzv = (tmp_path / "nt.bzv").read_bytes()
    (tmp_path / "nt.bzv").write_bytes(bzv[:50] + bzv[60:] + bzv[-10:])  # same size, one slot shifted
    with pytest.raises(kjv.SwordFormatError, match="should"):
        kjv.read_verses(tmp_path)


@needs_kjv
@pytest.mark.parametrize("damage", ["truncate_bzv", "bad_block", "bad_zlib", "missing"])
def test_damaged_module_is_refused(tmp_path, damage):
    for f in kjv.MODULE_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    if damage == "truncate_bzv":
        (tmp_path / "ot.bzv").write_bytes((tmp_path / "ot.bzv").read_bytes()[:-10])
    elif damage == "bad_block":
        bzv = bytearray((tmp_path / "ot.bzv").read_bytes())
        struct.pack_into("<I", bzv, 40, 9999)  # slot 4 names a block that does not exist
        (tmp_path / "ot.bzv").write_bytes(bytes(bzv))
    elif damage == "bad_zlib":
        bzz = bytearray((tmp_path / "ot.bzz").read_bytes())
        bzz[1110:1120] = b"\0" * 10  # the head of block 1
        (tmp_path / "ot.bzz").write_bytes(bytes(bzz))
    else:
        (tmp_path / "nt.bzz").unlink()
    with pytest.raises(kjv.SwordFormatError):
        kjv.read_verses(tmp_path)


@pytest.mark.parametrize("markup, text", [
    ('In the <w lemma="strong:H7225">beginning</w> <w lemma="strong:H0430">God</w>. ', "In the beginning God."),
    ('darkness <transChange type="added">was</transChange> upon', "darkness was upon"),
    ('the <divineName>LORD</divineName> said', "the LORD said"),
    ('<w>JEHOVAH</w><note type="explanation" n="a"><reference type="annotateRef">6.2 </reference>the '
     '<divineName>LORD\\+nd*: or, <seg type="x-nested">JEHOVAH</seg></note> was', "JEHOVAH was"),
    ('<title canonical="true" type="psalm">A <w>Psalm</w> of David.</title>LORD, how', "LORD, how"),
    ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><div sID="gen4" type="x-p"/> \u00b6 And', "And"),
    ('<l level="1" sID="a"/>my name \\nd <w>JEHOVAH</w></divineName> was', "my name JEHOVAH was"),
    ('<q marker="" who="Jesus">Surely I come quickly</q> .', "Surely I come quickly."),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("  \n ", ""),
])
def test_strip_osis(markup, text):
    assert kjv.strip_osis(markup) == text
