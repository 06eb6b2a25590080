#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Generate docs/api.md from include/vdk/vdk.h: the header's own comments
are the reference.  Sections follow the header's banner comments; every
declaration is listed with the comment above it.

    docs/gen-api.py [--check]    (--check: exit 1 if docs/api.md is stale
                                  or misses a VDK_API function)"""

import os
import re
import sys

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(SRC, 'include', 'vdk', 'vdk.h')
OUT = os.path.join(SRC, 'docs', 'api.md')


def clean_comment(c):
    c = re.sub(r'^/\*\*?', '', c.strip())
    c = re.sub(r'\*/$', '', c)
    lines = [re.sub(r'^\s*\* ?', '', l) for l in c.splitlines()]
    return '\n'.join(lines).strip()


def generate():
    text = open(HEADER).read()
    # the file comment (first block) is the overview
    first = re.match(r'\s*/\* SPDX[^\n]*\*/\s*(/\*.*?\*/)', text, re.S)
    out = ['# libvdk API reference', '',
           'Generated from `include/vdk/vdk.h` by `docs/gen-api.py`; the header is the source.', '']
    if first:
        body = clean_comment(first.group(1))
        body = re.sub(r'^vdk\.h - ', '', body)
        out += ['## Overview', '', '```', body, '```', '']
        text = text[first.end():]
    # tokens: banner, doc comment, declaration
    pos = 0
    pending = None
    names = []
    decl_re = re.compile(r'(VDK_API[^;]*;|typedef\s+(?:struct|enum)?[^;{]*\{.*?\}\s*\w+;|typedef[^;{]*;|#define\s+VDK_[A-Z_]+[^\n]*)', re.S)
    tok_re = re.compile(r'/\* -{10,} \*/\s*/\* ([^*]+?)\s*\*/\s*/\* -{10,} \*/|(/\*.*?\*/)|' + decl_re.pattern, re.S)
    for m in tok_re.finditer(text):
        if m.group(1):
            out += ['## ' + m.group(1).strip(), '']
            pending = None
        elif m.group(2):
            c = m.group(2)
            if c.startswith('/* ---') or 'SPDX' in c:
                continue
            pending = clean_comment(c)
        else:
            d = m.group(0).strip()
            if d.startswith('#define') and ('VDK_API' in d or 'VDK_VDK_H' in d):
                continue
            d = re.sub(r'\s+', ' ', d) if not d.startswith('typedef') else d
            d = d.replace('VDK_API ', '')
            for n in re.findall(r'\b(vdk_\w+)\s*\(', d):
                names.append(n)
            out += ['```c', d, '```', '']
            if pending:
                out += [pending, '']
                pending = None
    return '\n'.join(out).rstrip() + '\n', names


def main():
    doc, names = generate()
    api = set(re.findall(r'VDK_API[^;(]*?\b(vdk_\w+)\s*\(', open(HEADER).read()))
    missing = sorted(api - set(names))
    if '--check' in sys.argv:
        ok = True
        if missing:
            print('not documented: ' + ', '.join(missing))
            ok = False
        if not os.path.exists(OUT) or open(OUT).read() != doc:
            print('docs/api.md is stale: run docs/gen-api.py')
            ok = False
        print('api.md: %d functions, %s' % (len(api), 'up to date' if ok else 'STALE'))
        return 0 if ok else 1
    with open(OUT, 'w') as f:
        f.write(doc)
    print('wrote %s (%d functions)' % (OUT, len(api)))
    return 1 if missing else 0


if __name__ == '__main__':
    sys.exit(main())
