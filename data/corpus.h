// Reading raw text for `motley prepare`.
//
// Each input is a file or a directory:
//   - a directory is walked recursively; its regular files are read in
//     order of their path (byte-wise), so the document order, and so the
//     train/valid split, is the same on every machine. Files and folders
//     whose name starts with '.' are skipped.
//   - a file whose name ends in ".jsonl" holds one JSON object per line with
//     a string field "text": each line is one document. Blank lines are
//     skipped; a line that is not a JSON object with a string "text" is a
//     kData error naming FILE:LINE. Other fields are ignored.
//   - any other file is plain text and is ONE document, whatever it holds
//     (blank lines and form feeds included): split a corpus into files, or
//     use JSONL, to get several documents.
// Documents are raw bytes (no decoding, no normalisation). Empty documents
// are dropped. Inputs are read in the order given.
//
// kData if an input does not exist or cannot be read, or if the inputs hold
// no document at all.
#pragma once

#include <string>
#include <vector>

namespace motley {

std::vector<std::string> read_documents(const std::vector<std::string>& inputs);

}  // namespace motley
