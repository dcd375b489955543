# Source this file (do not execute it) to put the project-local tools on PATH:
#
#   source scripts/tools-env.sh
#
# The tools are installed by scripts/install-tools.sh into .tools/.
# shellcheck shell=bash
_comtrexx_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
case ":${PATH}:" in
  *":${_comtrexx_tools_root}/.tools/bin:"*) ;;
  *) PATH="${_comtrexx_tools_root}/.tools/bin:${_comtrexx_tools_root}/.tools/venv/bin:${PATH}" ;;
esac
export PATH
unset _comtrexx_tools_root
