package kube

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/csi-dmthin/csi-dmthin/pkg/blockcopy"
)

// Who may copy a node's blocks: the caller presents a service-account token
// the kubelet projected for one audience (the chart's copy.audience), and
// the serving node asks the API server who it belongs to. A token for the
// API server's own audience, which every pod is given, is refused: only a
// pod that mounts a token for the copy's audience can copy, and the chart
// gives one only to the driver container.

// ErrTokenRefused is wrapped by every refusal of a token the API server
// could judge (not authenticated, or not for the audience), as opposed to
// a failure to ask it.
var ErrTokenRefused = errors.New("token refused")

// TokenReviewer is a blockcopy.Authenticator that asks the API server
// (authentication.k8s.io/v1 TokenReview) whether a token is valid for
// Audience. It needs `create` on tokenreviews.
type TokenReviewer struct {
	Client   kubernetes.Interface
	Audience string
}

var _ blockcopy.Authenticator = (*TokenReviewer)(nil)

// Authenticate returns the user (system:serviceaccount:<ns>:<name> for a
// service-account token) the API server says presented token, if it is
// authenticated for r.Audience. Errors: the review could not be made (the
// API server's error, wrapped), or ErrTokenRefused, wrapped with why (the
// API server's status.error, or the audiences it did grant).
func (r *TokenReviewer) Authenticate(ctx context.Context, token string) (string, error) {
	if r.Audience == "" {
		// An empty spec.audiences means the API server's own audience: a
		// pod's ordinary token would pass.
		return "", errors.New("token review: no audience configured")
	}
	if token == "" {
		return "", fmt.Errorf("token review: no token presented: %w", ErrTokenRefused)
	}
	review := &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{r.Audience}}}
	got, err := r.Client.AuthenticationV1().TokenReviews().Create(ctx, review, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token review: asking the API server: %w", err)
	}
	st := got.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "no reason given"
		}
		return "", fmt.Errorf("token review: not authenticated (%s): %w", why, ErrTokenRefused)
	}
	// The API server answers with the audiences the token is valid for
	// among those asked; one that ignored the request's audiences (an
	// authenticator without audience support) answers with none.
	if !slices.Contains(st.Audiences, r.Audience) {
		return "", fmt.Errorf("token review: the token is for audiences %q, not %q: %w", st.Audiences, r.Audience, ErrTokenRefused)
	}
	if st.User.Username == "" {
		return "", fmt.Errorf("token review: authenticated with no user name: %w", ErrTokenRefused)
	}
	return st.User.Username, nil
}

// ServiceAccountUser is the user name the API server gives a service
// account's tokens.
func ServiceAccountUser(namespace, name string) string {
	return "system:serviceaccount:" + namespace + ":" + name
}

// TokenFile returns a token source that reads the projected
// service-account token at path at every call: the kubelet rewrites the
// file before the token expires, so a token read once would stop working.
// The token is trimmed of surrounding white space; an empty file is an
// error.
func TokenFile(path string) func() (string, error) {
	return func() (string, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("reading the copy token: %w", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("the copy token file %s is empty", path)
		}
		return tok, nil
	}
}
