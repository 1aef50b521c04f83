"""The data builder behind `build_dataset.py`: knowledge graph in, clinically careful instruction rows out.

Layers, each importing only the ones above it (and `utils.core`, `utils.llm`):

    resources   the data files beside this package: predicate map, cleaning lists, safety patterns, emergencies,
                phrasings, LLM prompts (YAML)
    safety      dose/frequency, contentless, absolute-claim detectors (shared by every gate)
    graph       reading a knowledge graph (cMeKG pickle through a no-globals unpickler, or JSON Lines), entity
                kinds, the predicate map, value cleaning
    rows        the row type, slot filling, joins
    questions   question kinds of one entity (facts, two facts at once, drug/test cases, dialogues)
    crossing    question kinds across entities (vignettes and differentials, reverse lookups, comparisons,
                multi-hop)
    gates       exact and near-duplicate removal (MinHash LSH), evaluation-question leaks, content gates
    report      the statistics report and its metrics
    output      writing, reading back, validation split, Hugging Face export
    knowledge   the template pipeline over a whole graph, with a progress bar
    llm_backend prompt kinds, grounding and safety filters, run manifest, work log, usage and cost
    literature  documents to dialogues (template and LLM)
"""
