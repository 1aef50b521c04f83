"""Generation: the shared flags (`args`), batched and streamed answers (`engine`), the multi-turn shape (`dialogue`)."""
