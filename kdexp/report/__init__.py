"""Reading finished runs back: tables with statistics (summary) and figures (plots) of a sweep's
run directories. Reads metrics.json files only; imports nothing of the engine."""
