"""The built-in tiny reasoner: synthetic reasoning tasks, its data, tiny test models and the shipped
teacher (``assets/tiny-reasoner``)."""
