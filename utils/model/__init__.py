"""Models and adapters: where they come from (`source`), what can be checked without their weights (`checks`),
and loading them (`loading`). Imports point down: loading -> checks -> source -> utils.runtime / utils.core."""
