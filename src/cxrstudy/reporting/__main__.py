"""``python -m cxrstudy.reporting --profile P``: put a profile's latest results into README.md."""

import argparse

from cxrstudy.reporting.pages import update_readme

parser = argparse.ArgumentParser(description="Put a profile's latest results into README.md")
parser.add_argument("--profile", default="default")
update_readme(parser.parse_args().profile)
