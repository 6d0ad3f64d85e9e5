"""The learned budget router (LLaMaFlex): budgets, the router, routing any budget to a Shape."""
