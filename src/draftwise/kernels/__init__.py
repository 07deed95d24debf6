"""draftwise's own C kernels, built with the system compiler on first use (`build.py`)."""
