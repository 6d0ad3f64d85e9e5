"""The learned budget router (LLaMaFlex): the router, routing any budget to a Shape, and its training controller."""
