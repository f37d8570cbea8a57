"""List or copy the configs shipped with xtuner-vitask (like `xtuner list-cfg` / `xtuner copy-cfg`)."""
from ..config_files import config_names, configs_dir, copy_config


def add_list_arguments(parser):
    parser.add_argument("-p", "--pattern", help="only names matching this glob (or containing this text)")
    parser.add_argument("--path", action="store_true", help="print full paths instead of names")


def run_list(args) -> int:
    names = config_names(args.pattern)
    print(f"configs in {configs_dir()}:" if not args.path else "", end="\n" if not args.path else "")
    for name, path in names.items():
        print(path if args.path else f"  {name}")
    return 0


def add_copy_arguments(parser):
    parser.add_argument("name", help="a config name from `xtuner-vitask list-cfg` (e.g. vitask_internvl2_2b_derma)")
    parser.add_argument("dest", help="folder to copy it into (its base folders come along)")


def run_copy(args) -> int:
    print(f"copied to {copy_config(args.name, args.dest)}")
    return 0


COMMANDS = {"list-cfg": (add_list_arguments, run_list), "copy-cfg": (add_copy_arguments, run_copy)}
