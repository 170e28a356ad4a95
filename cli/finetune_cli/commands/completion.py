"""`completion bash|zsh`: the shell completion script for `kubectl-finetune`.

Both scripts ask `kubectl_complete-finetune` (see `complete`) for the candidates, as kubectl
itself does for `kubectl finetune <TAB>` (kubectl 1.26 and later find that executable on PATH:
nothing to install for `kubectl finetune`). Load one with
`source <(kubectl finetune completion bash)` or put it in ~/.bashrc / a zsh fpath file.
Called through `parser`.
"""

from __future__ import annotations

from finetune_cli.app import App

BASH = r"""# bash completion for kubectl-finetune (kubectl finetune completes through kubectl_complete-finetune)
_kubectl_finetune() {
    local out directive line
    local -a candidates=()
    out=$(kubectl_complete-finetune "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null) || return
    directive=${out##*$'\n'}
    directive=${directive#:}
    while IFS= read -r line; do
        [[ $line == :* ]] && continue
        candidates+=("${line%%$'\t'*}")
    done <<< "$out"
    local current=${COMP_WORDS[COMP_CWORD]}
    COMPREPLY=()
    for line in "${candidates[@]}"; do
        [[ $line == "$current"* ]] && COMPREPLY+=("$line")
    done
    if [[ ${#COMPREPLY[@]} -eq 0 && $directive == 0 ]]; then
        COMPREPLY=($(compgen -f -- "$current"))
    fi
}
complete -F _kubectl_finetune kubectl-finetune
"""

ZSH = r"""#compdef kubectl-finetune
# zsh completion for kubectl-finetune (kubectl finetune completes through kubectl_complete-finetune)
_kubectl_finetune() {
    local -a lines candidates
    lines=("${(@f)$(kubectl_complete-finetune "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    local directive=${lines[-1]#:}
    candidates=("${(@)${(@)lines[1,-2]}%%$'\t'*}")
    if (( ${#candidates} )); then
        compadd -- "${candidates[@]}"
    elif [[ $directive == 0 ]]; then
        _files
    fi
}
compdef _kubectl_finetune kubectl-finetune
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH}


def cmd_completion(app: App) -> None:
    app.console.print(SCRIPTS[app.args.shell_name], end="", markup=False, highlight=False, soft_wrap=True)
