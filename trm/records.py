"""One JSONL record to its text: the parser behind trm/corpus.py's iter_texts.

Most lines of a corpus are {"text": "...", ...} with the text first, and for them the JSON string's bytes are the
text's bytes once \\n is unescaped: the fast path takes them without json.loads. Every other line goes to json.loads.
Both agree on what a record holds, whatever the order of its fields; a record they cannot read is skipped and counted
in the caller's CorpusStats.
"""
import json


def texts(lines, path, lineno, text_field, stats, min_chars, as_bytes):
    """Each record's text in `lines` (whole lines of `path`, the first numbered lineno + 1), as str or, as_bytes, its
    UTF-8 bytes; a record that is not JSON, has no string text, is not UTF-8 or is too short is skipped into stats."""
    key = json.dumps(text_field).encode()
    heads = [b"{" + key + sep for sep in (b': "', b':"')]  # how {"text": " starts a line
    for line in lines:
        lineno += 1
        raw = fast_path(line, heads, key)
        if raw is not None:
            try:
                text = raw.decode("utf-8")  # also the UTF-8 check; no \u escapes here, so no lone surrogates
            except UnicodeDecodeError:
                stats.skip(path, lineno, "undecodable bytes")
                continue
        else:
            try:
                # json decodes the UTF-8 bytes itself, faster than a separate .decode(); strict=False keeps a raw
                # tab or other control character inside the text, as the fast path does
                record = json.loads(line, strict=False)
            except UnicodeDecodeError:
                stats.skip(path, lineno, "undecodable bytes")
                continue
            except ValueError:
                if line.strip():
                    stats.skip(path, lineno, "malformed JSON")
                continue  # blank lines are not records
            text = record.get(text_field) if type(record) is dict else None
            if type(text) is not str:
                stats.skip(path, lineno, f"no string {text_field!r} field")
                continue
            # a lone surrogate cannot be written as UTF-8: from a \ud800-style escape, or from the bytes ED A0-BF
            # that json.loads decodes with 'surrogatepass' (ED starts no other character but Hangul, rare here)
            if (b"\\u" in line or b"\xed" in line) and not encodable(text):
                stats.skip(path, lineno, "undecodable bytes")
                continue
        if not text or len(text) < min_chars:
            stats.skip(path, lineno, "empty text" if not text else f"shorter than {min_chars} chars")
            continue
        stats.documents += 1
        stats.chars += len(text)
        if as_bytes:
            yield raw if raw is not None else text.encode("utf-8")
        else:
            yield text


def fast_path(line, heads, key):
    """The text's UTF-8 bytes if `line` is {"text": "...", ...} with the text first and no escape in it but \\n;
    None if the full JSON parser has to decide.

    Corpora are mostly this layout, and then the JSON string's bytes are the text's bytes once \\n is unescaped:
    json.loads would spend its time building a str (and parsing "meta") only for the writer to encode it back.
    The fields after the text are not parsed (on short documents that parse was most of the time), only checked
    for what a damaged line shows: a line cut short (its braces do not balance), a trailing comma, text after the
    closing brace. Those go to json.loads, which reports them. A line whose later fields are broken in some other way
    (braces inside their strings that happen to balance a cut) keeps its text."""
    if line.startswith(heads[0]):
        start = len(heads[0])
    elif line.startswith(heads[1]):
        start = len(heads[1])
    else:
        return None
    end = line.find(b'"', start)
    if end < 0:
        return None
    rest = line[end + 1:].strip()
    if not (rest == b"}" or rest[:1] == b"," and rest[-1:] == b"}") or key in rest:  # key twice: JSON keeps the last
        return None
    if rest != b"}" and (rest.count(b"{") + 1 != rest.count(b"}") or rest.rstrip(b"} \t\r").endswith(b",")):
        return None
    body = line[start:end]
    if b"\\" in body:
        body = b"\n".join(body.split(b"\\n"))  # split+join: a third faster than bytes.replace here
        if b"\\" in body:  # another escape, or an escaped quote that ended `body` early
            return None
    return body


def encodable(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
