package kube

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	authnv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const copyAudience = "dmthin.csi.dmthin.io/copy"

// reviewer returns a TokenReviewer on a fake API server whose TokenReview
// answer is status (or err), and the reviews it was sent.
func reviewer(status authnv1.TokenReviewStatus, err error) (*TokenReviewer, *[]authnv1.TokenReview) {
	var sent []authnv1.TokenReview
	c := fake.NewClientset()
	c.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		r := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		sent = append(sent, *r)
		if err != nil {
			return true, nil, err
		}
		r.Status = status
		return true, r, nil
	})
	return &TokenReviewer{Client: c, Audience: copyAudience}, &sent
}

func TestTokenReviewer(t *testing.T) {
	driverUser := ServiceAccountUser("kube-system", "csi-dmthin")
	ok := authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{copyAudience}, User: authnv1.UserInfo{Username: driverUser}}
	for _, tc := range []struct {
		name      string
		status    authnv1.TokenReviewStatus
		apiErr    error
		wantUser  string
		wantErr   error  // errors.Is
		wantInErr string // and in its text
	}{
		{name: "authenticated for the audience", status: ok, wantUser: driverUser},
		{name: "among other audiences", status: authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"other", copyAudience}, User: ok.User}, wantUser: driverUser},
		{name: "the API server fails", apiErr: apierrors.NewForbidden(authnv1.Resource("tokenreviews"), "", errors.New("no RBAC")),
			wantInErr: "asking the API server"},
		{name: "not authenticated", status: authnv1.TokenReviewStatus{Error: "token has expired"},
			wantErr: ErrTokenRefused, wantInErr: "not authenticated (token has expired)"},
		{name: "not authenticated, no reason", status: authnv1.TokenReviewStatus{},
			wantErr: ErrTokenRefused, wantInErr: "not authenticated (no reason given)"},
		// An authenticator that ignores the requested audiences says the
		// token is good for its own.
		{name: "another audience", status: authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"https://kubernetes.default.svc"}, User: ok.User},
			wantErr: ErrTokenRefused, wantInErr: `not "` + copyAudience + `"`},
		{name: "no audience", status: authnv1.TokenReviewStatus{Authenticated: true, User: ok.User},
			wantErr: ErrTokenRefused, wantInErr: "audiences []"},
		{name: "no user name", status: authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{copyAudience}},
			wantErr: ErrTokenRefused, wantInErr: "no user name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, sent := reviewer(tc.status, tc.apiErr)
			user, err := r.Authenticate(context.Background(), "the-token")
			switch {
			case tc.wantInErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.wantInErr != "" && err == nil:
				t.Fatalf("accepted as %q; want an error saying %q", user, tc.wantInErr)
			case err != nil && !strings.Contains(err.Error(), tc.wantInErr):
				t.Errorf("error %q does not say %q", err, tc.wantInErr)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Errorf("error %v is not %v", err, tc.wantErr)
			case tc.apiErr != nil && (errors.Is(err, ErrTokenRefused) || !apierrors.IsForbidden(err)):
				t.Errorf("an API failure %v reads as a refusal, or loses the API error", err)
			case err != nil && user != "":
				t.Errorf("user %q with an error", user)
			}
			if user != tc.wantUser {
				t.Errorf("user %q, want %q", user, tc.wantUser)
			}
			if len(*sent) != 1 {
				t.Fatalf("%d reviews sent, want 1", len(*sent))
			}
			if s := (*sent)[0].Spec; s.Token != "the-token" || !slices.Equal(s.Audiences, []string{copyAudience}) {
				t.Errorf("review sent %+v, want the token and the audience", s)
			}
		})
	}
}

// An empty token, or no audience to ask for, never reaches the API server.
func TestTokenReviewerRefusesWithoutAsking(t *testing.T) {
	r, sent := reviewer(authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{copyAudience}, User: authnv1.UserInfo{Username: "u"}}, nil)
	if _, err := r.Authenticate(context.Background(), ""); !errors.Is(err, ErrTokenRefused) {
		t.Errorf("an empty token: %v", err)
	}
	r.Audience = ""
	if _, err := r.Authenticate(context.Background(), "the-token"); err == nil || !strings.Contains(err.Error(), "no audience") {
		t.Errorf("no audience: %v", err)
	}
	if len(*sent) != 0 {
		t.Errorf("%d reviews sent", len(*sent))
	}
}

func TestServiceAccountUser(t *testing.T) {
	if got := ServiceAccountUser("kube-system", "csi-dmthin"); got != "system:serviceaccount:kube-system:csi-dmthin" {
		t.Errorf("ServiceAccountUser: %q", got)
	}
}

// The token is read at every call, as the kubelet rotates the file.
func TestTokenFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	src := TokenFile(path)
	if _, err := src(); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("no file: %v", err)
	}
	for _, tc := range []struct{ content, want string }{
		{"first\n", "first"},
		{"  rotated \n", "rotated"},
	} {
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got, err := src(); err != nil || got != tc.want {
			t.Errorf("file %q: %q, %v; want %q", tc.content, got, err, tc.want)
		}
	}
	if err := os.WriteFile(path, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := src(); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Errorf("an empty file: %q, %v", got, err)
	}
}
