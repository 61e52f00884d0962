"""--sites takes the paper's four sites and attn_qk; anything else is a clear argparse error."""
from cli_helpers import cli_error

import vtp
from vtp.app import cli


def test_sites_take_attn_qk_and_default_to_the_papers_four():
    parser, _ = cli.build_parser()
    args = parser.parse_args(["sparse-train", "--sites", "attn_in", "attn_qk"])
    assert args.sites == ["attn_in", "attn_qk"]
    assert parser.parse_args(["sparse-train"]).sites == list(vtp.SITES)


def test_bad_sites_are_a_clear_error(capsys):
    err = cli_error(capsys, ["sparse-train", "--sites", "attn_in", "attn_kq"], code=2)
    assert "--sites" in err and "invalid choice: 'attn_kq'" in err and "attn_qk" in err
