"""The option table (options.py): the one source of the options' names, plan fields and
defaults, and of the README's option table. Parsing the values is in test_settings.py."""
import re

from unitutil import REPO, facts
from dkvm.host.settings import kind_of
from dkvm.options import BY_ENV, OPTIONS
from dkvm.schema import Options, Plan


def test_every_option_is_a_field_of_the_plan_with_its_default():
    """One row makes the option: its plan field and default come from the table."""
    in_options = [option for option in OPTIONS if not option.plan_field]
    assert list(Options.FIELDS) == [option.attr for option in in_options]
    assert Options().as_dict() == {option.attr: option.default for option in in_options}
    plan = Plan().as_dict()
    assert {option.attr: option.default for option in OPTIONS if option.plan_field} == \
        {option.attr: plan[option.attr] for option in OPTIONS if option.plan_field}
    for option in OPTIONS:
        assert option.env.startswith("DKVM_") and BY_ENV[option.env] is option
        kind = kind_of(option)
        # what the README shows as the default parses back to it ("empty" text aside)
        if kind.show(option.default) != "empty":
            assert kind.parse(option.env, kind.show(option.default), facts()) == option.default


def readme_options():
    """The README's option table: {option: (values, default)}."""
    text = (REPO / "README.md").read_text()
    rows = {}
    for line in text.split("## Options", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(DKVM_\w+)`", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match.group(1)] = (cells[1], cells[2].strip("`"))
    return rows


def test_readme_option_table_matches_the_option_table():
    assert readme_options() == {option.env: (kind_of(option).accepts,
                                             kind_of(option).show(option.default))
                                for option in OPTIONS}
