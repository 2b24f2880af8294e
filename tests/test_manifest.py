"""codec.manifest: the one manifest reader and writer, its line-numbered errors, and the files it lists."""

import pytest

from codec.errors import AudioError
from codec.manifest import ManifestRow, read_listing, read_manifest, read_rows, write_manifest


def test_manifest_round_trip(tmp_path):
    rows = [
        ManifestRow("wav/b/2.wav", "b", 2.5, "dev-ood", "telephone", "fr-FR", "telephone"),
        ManifestRow("wav/a/1.wav", "a", 1.25, "train", "asterisk", "en-US", "read"),
    ]
    assert write_manifest(tmp_path / "m.csv", rows) == 2
    text = (tmp_path / "m.csv").read_text().splitlines()
    assert text[0] == "path,speaker,duration,split,source,language,kind"
    assert text[1] == "wav/a/1.wav,a,1.250,train,asterisk,en-US,read"  # sorted by path
    assert read_rows(tmp_path / "m.csv") == sorted(rows, key=lambda r: r.path)
    assert [item.kind for item in read_manifest(tmp_path / "m.csv")] == ["read", "telephone"]


def test_manifest_without_kind_still_reads(tmp_path):
    (tmp_path / "m.csv").write_text("path,speaker,duration,split,source,language\nwav/a/1.wav,a,1.5,dev,s,en\n")
    assert read_rows(tmp_path / "m.csv") == [ManifestRow("wav/a/1.wav", "a", 1.5, "dev", "s", "en", "")]
    assert read_manifest(tmp_path / "m.csv")[0].kind is None


def test_any_columns_by_name_and_a_plain_list(tmp_path):
    (tmp_path / "m.csv").write_text("# made by hand\ntext,path,speaker\nhello,a.wav,\n\nbye,/abs/b.flac,bob\n")
    assert read_rows(tmp_path / "m.csv") == [ManifestRow("a.wav"), ManifestRow("/abs/b.flac", "bob")]
    (tmp_path / "list.txt").write_text("spk1/u1.wav\n# comment\n  spk2/u2.flac  \n")
    assert read_rows(tmp_path / "list.txt") == [ManifestRow("spk1/u1.wav"), ManifestRow("spk2/u2.flac")]


def test_manifest_items_resolve_paths_and_guess_missing_speakers(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c/m.csv").write_text("path,speaker,duration,split\nwav/p225/p225_001.wav,,,\nx/y.wav,ann,2.0,dev\n")
    items = read_manifest(tmp_path / "c/m.csv")
    root = (tmp_path / "c").resolve()
    assert [(i.path, i.speaker, i.named_speaker, i.duration, i.split, i.key) for i in items] == [
        (root / "wav/p225/p225_001.wav", "p225", False, None, None, "wav/p225/p225_001.wav"),
        (root / "x/y.wav", "ann", True, 2.0, "dev", "x/y.wav"),
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("file,speaker\nx.wav,a\n", ":1: a CSV manifest's header must name a path column"),
        ("path,speaker,path\nx.wav,a,y.wav\n", ":1: column.s. path named twice"),
        ("path,speaker,duration,split,source,language\n# c\nx.wav,a,abc,train,s,en\n", ":3: duration 'abc' is not"),
        ("path,speaker,duration,split,source,language\nx.wav,a,-1,train,s,en\n", ":2: duration must be a positive"),
        ("path,speaker,duration,split,source,language\nx.wav,a,nan,train,s,en\n", ":2: duration must be a positive"),
        ("path,speaker,duration,split,source,language\nx.wav,a,1,train,s,en\n\nx.wav,a,1.0,train\n", ":4: expected 6"),
        ("path,speaker\nx.wav,a\n,b\n", ":3: empty path"),
        ("# only a comment\n\n", "lists no files"),
        ("path,speaker\n", "lists no files"),
    ],
)
def test_malformed_manifest_names_its_line(tmp_path, body, message):
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(AudioError, match=message):
        read_rows(tmp_path / "m.csv")


def test_what_is_not_a_manifest(tmp_path):
    with pytest.raises(AudioError, match="no manifest"):
        read_rows(tmp_path / "absent.csv")
    with pytest.raises(AudioError, match="no folder or manifest"):
        read_listing(tmp_path / "absent.csv")
    (tmp_path / "a.wav").write_bytes(b"RIFF\0\0\0\0WAVE")
    with pytest.raises(AudioError, match="is an audio file, not a manifest"):
        read_listing(tmp_path / "a.wav")
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe\0binary")
    with pytest.raises(AudioError, match="is not a text file, not a manifest"):
        read_manifest(tmp_path / "b.csv")
    assert [(i.key, i.speaker, i.named_speaker) for i in read_listing(tmp_path)] == [("a.wav", tmp_path.name, False)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioError, match="no wav/flac/ogg files under"):
        read_listing(tmp_path / "empty")
