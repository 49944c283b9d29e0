"""Planning: peak GPU memory of a recipe from its architecture (planner), the batch / accumulation / rank layout
(layout), and what `plan`, `show` and `recipes` print (report).
"""
