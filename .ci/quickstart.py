"""Print the commands of the README's Quick start bash block, one per line."""

import re
import sys

text = open(sys.argv[1]).read()
section = text.split("## Quick start", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
for line in block.splitlines():
    if line.strip() and not line.lstrip().startswith("#"):
        print(line.strip())
