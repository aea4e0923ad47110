"""Examples, prompts and RAG: tasks, exemplars, visual tokens per row, task sampling, image controls, box text."""
